"""The demo's last line is a command that runs as printed, and its contact sheet reads on its own."""

import os
import shlex
import subprocess

import numpy as np
from click.testing import CliRunner
from PIL import Image

from engine.cli import main
from engine.demo import taste_frame
from indexer.world import generate


def test_the_demos_next_command_runs_as_printed(tmp_path):
    out = CliRunner().invoke(main, ["--home", str(tmp_path), "demo", "--images", "120", "--questions", "5"])
    assert out.exit_code == 0, out.output
    last = out.output.strip().splitlines()[-1]
    assert last.startswith("Next: ")
    command = shlex.split(last[len("Next: ") :])
    env = {k: v for k, v in os.environ.items() if k != "CLIPBT_HOME"}  # a fresh shell: the default home
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.splitlines()) == 10 and str(tmp_path) in run.stdout


def test_the_contact_sheet_has_a_title_labels_and_a_legend_framed_by_the_whole_taste(tmp_path):
    CliRunner().invoke(main, ["--home", str(tmp_path), "demo", "--images", "120", "--questions", "5"])
    sheet = np.asarray(Image.open(tmp_path / "demo" / "contact_sheet.png").convert("RGB"))
    dark = (sheet.sum(axis=2) < 200).any(axis=1)  # rows holding black text
    assert dark[:40].any() and dark[-25:].any()  # title above, legend below the thumbnails
    frames = {taste_frame(attrs) for _, attrs in generate(300, seed=0)}
    assert frames == {"green", "orange", "red"}
    for _, attrs in generate(300, seed=0):
        whole = not attrs.filled and attrs.quality not in ("blur", "noise")
        assert (taste_frame(attrs) == "green") == whole
