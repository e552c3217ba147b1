"""Vector indexes: one interface (`base.VectorIndex`), its implementations (`faiss`), and the index of a stored collection (`collection`)."""
