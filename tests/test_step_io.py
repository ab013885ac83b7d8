import numpy as np
import pytest

from model_training.common.step_io import (atomic_write, load_cams, load_png, pending_ids,
                                           run_over_images, save_cams, save_png)


def test_cams_round_trip(tmp_path):
    cam = np.random.rand(2, 3, 4).astype(np.float32)
    high = np.random.rand(2, 12, 16).astype(np.float32)
    save_cams(tmp_path / "a.npz", [3, 5], cam, high)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as raw:
        assert raw["cam"].dtype == np.float16 and raw["keys"].tolist() == [3, 5]
    data = load_cams(tmp_path / "a.npz")
    np.testing.assert_allclose(data["high_res"], high, atol=1e-3)


def test_failed_write_leaves_nothing(tmp_path):
    def broken(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.png", broken)
    assert list(tmp_path.iterdir()) == []


def test_resume_and_skip_bad_images(tmp_path, capsys):
    save_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8))
    assert pending_ids(["a", "b"], tmp_path, ".png") == ["b"]
    assert pending_ids(["a", "b"], tmp_path, ".png", overwrite=True) == ["a", "b"]

    def work(image_id):
        if image_id == "bad":
            raise OSError("cannot read image /data/bad.jpg")
        save_png(tmp_path / f"{image_id}.png", np.ones((2, 2), np.uint8))

    done, failed = run_over_images(["c", "bad", "d"], work, "test")
    assert (done, failed) == (2, ["bad"])
    assert "bad.jpg" in capsys.readouterr().err
    assert load_png(tmp_path / "d.png").max() == 1
