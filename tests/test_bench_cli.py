"""`clipbt bench preference` in-process on a small embeddings file: JSON shape, table, files, errors."""

import json

import numpy as np
from click.testing import CliRunner
from indexer_fixtures import TEST_MODEL, make_images, register_test_model

from engine.cli import main


def write_npz(path, m=400, d=8, seed=0, users=False):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    a, b = rng.normal(size=(m, d)), rng.normal(size=(m, d))
    win = rng.random(m) < 1 / (1 + np.exp(-3 * (a - b) @ w))
    extra = {"user": np.array(["ann", "bob"])[rng.integers(0, 2, m)]} if users else {}
    np.savez(
        path,
        query=rng.normal(size=(1, d)),
        preferred=np.where(win[:, None], a, b),
        rejected=np.where(win[:, None], b, a),
        **extra,
    )
    return path


def test_json_output_and_result_files(tmp_path):
    data = write_npz(tmp_path / "pairs.npz")
    out = tmp_path / "results"
    res = CliRunner().invoke(
        main,
        [
            "bench",
            "preference",
            str(data),
            "--sizes",
            "0,1,5",
            "--repeats",
            "2",
            "--eval-size",
            "100",
            "--json",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert set(report["methods"]) == {
        "original",
        "positive",
        "bt",
        "map",
        "bt_margin",
        "bt_selected",
        "rocchio",
        "average_vector",
    }
    assert report["skipped"] == {"plackett_luce": "the dataset has pairs, not rankings"}
    assert report["oracle"] is None
    assert report["methods"]["bt"]["N"] == [0, 1, 5] and len(report["methods"]["bt"]["mean"]) == 3
    assert len(report["methods"]["map"]["std_splits"]) == 3 and len(report["hyperparameters"]["map"]) == 3
    assert report["counts"]["eval_pairs"] == 100
    assert report["command"].startswith(
        f"clipbt bench preference {data} --format npz --sizes 0,1,5 --repeats 2 --splits 3"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "preference_npz.json",
        "preference_npz.md",
        "preference_npz.png",
        "preference_npz_reliability.png",
    ]
    assert json.loads((out / "preference_npz.json").read_text())["methods"] == report["methods"]


def test_table_output_per_user(tmp_path):
    data = write_npz(tmp_path / "pairs.npz", users=True)
    res = CliRunner().invoke(
        main,
        ["bench", "preference", str(data), "--sizes", "0,2", "--repeats", "2", "--per-user", "--out", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == "| method | N=0 | N=2 |"
    assert "| bt | " in res.output and (tmp_path / "preference_npz_per_user.png").is_file()


def test_images_are_encoded_with_the_chosen_model(tmp_path):
    register_test_model()
    paths = make_images(tmp_path / "img", 12)
    rng = np.random.default_rng(0)
    lines = [
        {
            "prompt": f"picture {i % 3}",
            "image_a": str(paths[a].relative_to(tmp_path)),
            "image_b": str(paths[b].relative_to(tmp_path)),
            "preferred": "ab"[i % 2],
            "user": "u",
        }
        for i, (a, b) in enumerate(rng.integers(0, 12, size=(40, 2)))
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    res = CliRunner().invoke(
        main,
        [
            "bench",
            "preference",
            str(tmp_path / "pairs.jsonl"),
            "--sizes",
            "0,2",
            "--repeats",
            "2",
            "--query",
            "pair",
            "--model",
            TEST_MODEL,
            "--pretrained",
            "random",
            "--json",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["config"]["model"] == TEST_MODEL and report["config"]["query"] == "pair"
    assert report["counts"]["pairs"] == 40
    assert report["methods"]["bt"]["mean"][0] == report["methods"]["original"]["mean"][0]


def test_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["bench", "preference", str(tmp_path / "nope.parquet")])
    assert res.exit_code == 1 and res.output == f"Error: no such dataset file: {tmp_path / 'nope.parquet'}\n"
    res = runner.invoke(main, ["bench", "preference", str(write_npz(tmp_path / "p.npz")), "--per-user"])
    assert res.exit_code == 1 and res.output == "Error: --per-user needs user ids, and this dataset has none\n"
    res = runner.invoke(main, ["bench", "preference", "world", "--sizes", "1,x"])
    assert res.exit_code == 2 and "expected comma-separated whole numbers like 0,1,5, got '1,x'" in res.output


def test_every_bench_command_has_help():
    assert CliRunner().invoke(main, ["bench", "--help"]).exit_code == 0
    res = CliRunner().invoke(main, ["bench", "preference", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output
