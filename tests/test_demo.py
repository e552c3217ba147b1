"""`clipbt demo` end to end at a small size, with the shipped model."""

from click.testing import CliRunner
from PIL import Image

from engine.cli import main
from engine.demo import DEMO_COLLECTION, DemoConfig, demo_user, matches_taste, run_demo
from indexer.encoder import model_identity
from indexer.world import generate
from storage import Store, StoreConfig


def test_demo_taste_share_improves_after_adaptation(tmp_path):
    lines = []
    result = run_demo(
        tmp_path, DemoConfig(images=400, questions=20, candidates=40, k=10), echo=lines.append, progress=False
    )
    assert result.answers == 20
    assert len(result.before) == len(result.after) == 10
    assert result.share_after > result.share_before, "\n".join(lines)
    assert Image.open(result.contact_sheet).size[0] > 10 * 96
    assert any("Share of the top 10 matching the taste" in line for line in lines)


def test_demo_user_prefers_what_matches_the_taste():
    images = [attrs for _, attrs in generate(200, seed=3)]
    user = demo_user()
    liked = [a for a in images if matches_taste(a)]
    disliked = [a for a in images if not matches_taste(a)]
    assert min(user.probability(a, b) for a, b in zip(liked, disliked) if a.quality == b.quality) > 0.9


def test_demo_command_runs_through_the_cli(tmp_path):
    out = CliRunner().invoke(main, ["--home", str(tmp_path), "demo", "--images", "120", "--questions", "5"])
    assert out.exit_code == 0, out.output
    assert "after adaptation" in out.output and "Contact sheet:" in out.output


def test_demo_indexes_again_a_collection_left_by_earlier_shipped_weights(tmp_path):
    earlier = "sha256:" + "0" * 64
    with Store.open(None, home=tmp_path, config=StoreConfig(index_dir=tmp_path / "indexes")) as store:
        store.create_collection(DEMO_COLLECTION, "clipbt-tiny", earlier, 128)
    lines = []
    run_demo(tmp_path, DemoConfig(images=60, questions=3, candidates=20, k=5), echo=lines.append, progress=False)
    assert any("The shipped model changed" in line for line in lines), "\n".join(lines)
    with Store.open(None, home=tmp_path) as store:
        assert store.collection(DEMO_COLLECTION).pretrained == model_identity(None, None)[1] != earlier
        assert len(store.image_ids(DEMO_COLLECTION)) == 60
