"""`clipbt demo` end to end at a small size, with the shipped model."""

from click.testing import CliRunner
from PIL import Image

from engine.cli import main
from engine.demo import DemoConfig, demo_user, matches_taste, run_demo
from indexer.world import generate


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
