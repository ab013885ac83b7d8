"""Progress in a log file (stderr not a terminal, as under pytest's capture) is plain lines,
one per tenth of a loop, not carriage-return redraws; on a terminal it stays tqdm's bar."""
import re
import sys

from tqdm import tqdm

from model_training.common.progress import progress
from model_training.common.step_io import run_over_images


def _lines(text: str) -> list[str]:
    assert "\r" not in text
    return [re.sub(r", \d+s", ", Ts", line) for line in text.splitlines()]


def test_a_line_per_tenth_with_the_latest_postfix(capsys):
    bar = progress(range(20), "epoch 1/3", unit="batch")
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.2f}")
    assert _lines(capsys.readouterr().err) == [
        f"epoch 1/3: {n}/20 batch ({5 * n}%), Ts, loss={1 / n:.2f}" for n in range(2, 21, 2)]


def test_few_items_print_once_each(capsys):
    list(progress(["a", "b", "c"], "3_ir_labels", unit="img"))
    assert _lines(capsys.readouterr().err) == [
        "3_ir_labels: 1/3 img (33%), Ts", "3_ir_labels: 2/3 img (66%), Ts",
        "3_ir_labels: 3/3 img (100%), Ts"]


def test_unknown_length_prints_at_the_end(capsys):
    assert list(progress((i for i in range(5)), "val")) == [0, 1, 2, 3, 4]
    assert _lines(capsys.readouterr().err) == ["val: 5 it, Ts"]


def test_inner_and_disabled_loops_are_silent_in_a_log(capsys):
    assert list(progress(range(4), "val", leave=False)) == [0, 1, 2, 3]
    assert list(progress(range(4), "epoch 1/1", disable=True)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""


def test_a_warning_is_a_line_of_its_own(capsys):
    def fail_on_b(image_id):
        if image_id == "b":
            raise OSError("cannot read image")

    assert run_over_images(["a", "b"], fail_on_b, "2_cams") == (1, ["b"])
    assert _lines(capsys.readouterr().err) == [
        "2_cams: 1/2 img (50%), Ts", "warning: b: cannot read image", "2_cams: 2/2 img (100%), Ts"]


def test_a_terminal_keeps_the_tqdm_bar(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress(range(3), "2_cams", unit="img")
    assert isinstance(bar, tqdm) and bar.desc == "2_cams" and bar.unit == "img"
    bar.close()
