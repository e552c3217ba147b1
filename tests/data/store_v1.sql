-- A store written by clipbt 0.1.0 (schema version 1), dumped with sqlite3's iterdump().
-- Frozen: never regenerate it; tests/test_storage_durability.py opens it with the current code.
BEGIN TRANSACTION;
CREATE TABLE clipbt_meta (
	"key" VARCHAR(64) NOT NULL, 
	value VARCHAR(256) NOT NULL, 
	PRIMARY KEY ("key")
);
INSERT INTO "clipbt_meta" VALUES('schema_version','1');
INSERT INTO "clipbt_meta" VALUES('store_id','03116c9cc5104c26af6a8dc75a25e29f');
CREATE TABLE collections (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	name VARCHAR(256) NOT NULL, 
	model VARCHAR(256) NOT NULL, 
	pretrained VARCHAR(256) NOT NULL, 
	dim INTEGER NOT NULL, 
	embedding_dtype VARCHAR(16) NOT NULL, 
	created DATETIME NOT NULL, 
	UNIQUE (name)
);
INSERT INTO "collections" VALUES(1,'photos','ViT-B-32','openai',4,'float16','2026-11-23 05:06:59.214697');
INSERT INTO "collections" VALUES(2,'art','ViT-B-32','sha256:be4e4dc1f1e4907ebc4040e2a6c2ebcba6bf79cc8211367a3aceedb760503840',4,'float32','2026-11-23 05:06:59.218641');
CREATE TABLE embeddings (
	image_id INTEGER NOT NULL, 
	data BLOB NOT NULL, 
	PRIMARY KEY (image_id), 
	FOREIGN KEY(image_id) REFERENCES images (id) ON DELETE CASCADE
);
INSERT INTO "embeddings" VALUES(1,X'9A358F3A483533BD');
INSERT INTO "embeddings" VALUES(2,X'483B333752B8A438');
INSERT INTO "embeddings" VALUES(3,X'C335A434AE276638');
INSERT INTO "embeddings" VALUES(4,X'ECB91FB1AEB7CD38');
INSERT INTO "embeddings" VALUES(5,X'0AD7233DE17A94BE14AE47BFB81E85BE');
INSERT INTO "embeddings" VALUES(6,X'0AD7233C295C8FBEB81EA53FAE47813F');
CREATE TABLE images (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	collection_id INTEGER NOT NULL, 
	uri TEXT NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	width INTEGER NOT NULL, 
	height INTEGER NOT NULL, 
	caption TEXT, 
	meta JSON, 
	added DATETIME NOT NULL, 
	deleted BOOLEAN NOT NULL, 
	FOREIGN KEY(collection_id) REFERENCES collections (id) ON DELETE CASCADE
);
INSERT INTO "images" VALUES(1,1,'/data/photos/0.jpg','5feceb66ffc86f38d952786c6d696c79c2dbc239dd4e91b46729d73a27fb57e9',64,48,'a cat','null','2026-11-23 05:06:59.226363',0);
INSERT INTO "images" VALUES(2,1,'/data/photos/1.jpg','6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b',64,48,NULL,'{"exif": {"iso": 100}}','2026-11-23 05:06:59.226363',0);
INSERT INTO "images" VALUES(3,1,'/data/photos/2.jpg','d4735e3a265e16eee03f59718b9b5d03019c07d8b6c51f90da3a666eec13ab35',64,48,NULL,'null','2026-11-23 05:06:59.226363',0);
INSERT INTO "images" VALUES(4,1,'/data/photos/3.jpg','4e07408562bedb8b60ce05c1decfe3ad16b72230967de01f640b7e4729b49fce',64,48,NULL,'null','2026-11-23 05:06:59.226363',1);
INSERT INTO "images" VALUES(5,2,'/data/art/0.png','4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e',32,32,NULL,'null','2026-11-23 05:06:59.234794',0);
INSERT INTO "images" VALUES(6,2,'/data/art/1.png','f55ff16f66f43360266b95db6f8fec01d76031054306ae4a4b380598f6cfd114',32,32,NULL,'null','2026-11-23 05:06:59.234794',0);
CREATE TABLE pairs (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	user_id INTEGER NOT NULL, 
	collection_id INTEGER NOT NULL, 
	"query" TEXT NOT NULL, 
	preferred_id INTEGER NOT NULL, 
	rejected_id INTEGER NOT NULL, 
	weight FLOAT NOT NULL, 
	source VARCHAR(64) NOT NULL, 
	created DATETIME NOT NULL, 
	CONSTRAINT ck_pairs_distinct CHECK (preferred_id <> rejected_id), 
	CONSTRAINT ck_pairs_weight CHECK (weight > 0), 
	FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE, 
	FOREIGN KEY(collection_id) REFERENCES collections (id) ON DELETE CASCADE, 
	FOREIGN KEY(preferred_id) REFERENCES images (id) ON DELETE CASCADE, 
	FOREIGN KEY(rejected_id) REFERENCES images (id) ON DELETE CASCADE
);
INSERT INTO "pairs" VALUES(1,1,1,'a cat',1,2,1.0,'pair','2026-11-23 05:06:59.245076');
INSERT INTO "pairs" VALUES(2,1,1,'a dog',3,1,0.5,'click','2026-11-23 05:06:59.259047');
INSERT INTO "pairs" VALUES(3,3,2,'painting',6,5,1.0,'pair','2026-11-23 05:06:59.263171');
CREATE TABLE ranking_items (
	ranking_id INTEGER NOT NULL, 
	position INTEGER NOT NULL, 
	image_id INTEGER NOT NULL, 
	tier INTEGER NOT NULL, 
	PRIMARY KEY (ranking_id, position), 
	CONSTRAINT uq_ranking_items_image UNIQUE (ranking_id, image_id), 
	FOREIGN KEY(ranking_id) REFERENCES rankings (id) ON DELETE CASCADE, 
	FOREIGN KEY(image_id) REFERENCES images (id) ON DELETE CASCADE
);
INSERT INTO "ranking_items" VALUES(1,0,2,0);
INSERT INTO "ranking_items" VALUES(1,1,3,1);
INSERT INTO "ranking_items" VALUES(1,2,1,2);
INSERT INTO "ranking_items" VALUES(2,0,3,0);
INSERT INTO "ranking_items" VALUES(2,1,1,1);
INSERT INTO "ranking_items" VALUES(2,2,2,1);
CREATE TABLE rankings (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	user_id INTEGER NOT NULL, 
	collection_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	"query" TEXT NOT NULL, 
	source VARCHAR(64) NOT NULL, 
	created DATETIME NOT NULL, 
	CONSTRAINT ck_rankings_kind CHECK (kind IN ('ranking', 'feedback')), 
	FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE, 
	FOREIGN KEY(collection_id) REFERENCES collections (id) ON DELETE CASCADE
);
INSERT INTO "rankings" VALUES(1,1,1,'ranking','a cat','ranking','2026-11-23 05:06:59.267907');
INSERT INTO "rankings" VALUES(2,3,1,'feedback','a cat','feedback','2026-11-23 05:06:59.275333');
CREATE TABLE users (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	name VARCHAR(256) NOT NULL, 
	pref_version INTEGER NOT NULL, 
	created DATETIME NOT NULL, 
	UNIQUE (name)
);
INSERT INTO "users" VALUES(1,'ann',3,'2026-11-23 05:06:59.242363');
INSERT INTO "users" VALUES(3,'bob',2,'2026-11-23 05:06:59.262327');
CREATE UNIQUE INDEX ix_images_live_uri ON images (collection_id, uri) WHERE deleted = 0;
CREATE INDEX ix_rankings_user ON rankings (user_id, id);
CREATE INDEX ix_pairs_user ON pairs (user_id, id);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('collections',2);
INSERT INTO "sqlite_sequence" VALUES('images',6);
INSERT INTO "sqlite_sequence" VALUES('users',5);
INSERT INTO "sqlite_sequence" VALUES('pairs',3);
INSERT INTO "sqlite_sequence" VALUES('rankings',2);
COMMIT;
