import numpy as np
from PIL import Image

from zooprune.cli import main


def test_methods_lists_every_method(capsys):
    from zooprune import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)


def test_run_answers_on_a_tiny_model_saved_to_disk(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "model")]) == 0
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(
        image
    )
    code = main(
        [
            "run",
            "--model",
            str(tmp_path / "model"),
            "--image",
            str(image),
            "--prompt",
            "what is in the image ?",
            "--method",
            "divprune",
            "--keep",
            "9",
            "--max-new-tokens",
            "3",
            "--show",
            str(tmp_path / "kept.png"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "answer:" in out and "9 / 64" in out
    for column in ("vision encode", "selection", "prefill", "decode"):
        assert column in out
    assert (tmp_path / "kept.png").read_bytes()[:4] == b"\x89PNG"


def test_run_reports_bad_input(tmp_path, capsys):
    main(["tiny", str(tmp_path / "model")])
    image = tmp_path / "scene.png"
    Image.new("RGB", (40, 40)).save(image)
    base = ["run", "--model", str(tmp_path / "model"), "--image", str(image), "--prompt", "hi"]
    assert main([*base, "--method", "nope"]) == 2
    assert "known methods" in capsys.readouterr().out
    assert main([*base[:4], str(tmp_path / "missing.png"), *base[5:]]) == 2
    assert "no such image" in capsys.readouterr().out
