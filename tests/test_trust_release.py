"""Issue 22, release side: nothing the user has is silently overwritten, weights get the umask's
file mode, and only the user's own errors are one-line exits (a bug keeps its traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_errors import _cli
from test_export_integrity import saved  # noqa: F401 - a tiny saved model (module fixture)
from test_import_molmo2 import build_stock_molmo2

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> Path:
    return build_stock_molmo2(tmp_path_factory.mktemp("trust") / "stock")


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}


def test_import_refuses_a_non_empty_folder_like_export(stock, tmp_path, monkeypatch, capsys, umask_027):
    out = tmp_path / "imported"
    out.mkdir()
    (out / "notes.txt").write_text("a previous import's notes")
    code, err = _cli(["import", str(stock), str(out)], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing was written

    code, _ = _cli(["import", str(stock), str(out), "--overwrite"], monkeypatch, capsys)
    assert code == 0 and (out / "notes.txt").read_text() == "a previous import's notes"
    modes = _modes(out)
    assert "model.safetensors" in modes
    assert set(modes.values()) == {umask_027}, modes  # weights too, not safetensors' 0600


def test_saved_and_exported_weights_follow_the_umask(saved, tmp_path, umask_027):  # noqa: F811
    from mmsmall.export import run_export
    from mmsmall.export.load import load_model

    load_model(saved).save_pretrained(tmp_path / "model")
    assert set(_modes(tmp_path / "model").values()) == {umask_027}, _modes(tmp_path / "model")
    for fmt in ("mmsmall", "molmo2"):
        out = run_export(str(saved), str(tmp_path / fmt), fmt=fmt, max_shard_size="300KB")
        assert len(list(out.glob("model-*.safetensors"))) > 1
        assert set(_modes(out).values()) == {umask_027}, (fmt, _modes(out))


def test_only_user_errors_are_one_line_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    code, err = _cli(["chat", "Hi?", "--model", str(tmp_path / "no_model")], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "does not exist" in err[0], err  # the user's mistake

    bug = (
        "import sys; from mmsmall import cli\n"
        "@cli.app.command('broken')\n"
        "def broken():\n"
        "    open('/nonexistent/file/the/code/meant/to/write')\n"
        "sys.argv = ['mmsmall', 'broken']; cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", bug], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr, proc.stderr


def test_eval_chat_predict_refuse_bad_numbers_before_loading(saved, tmp_path, monkeypatch, capsys):  # noqa: F811
    from test_eval_tasks import make_chartqa_json

    from data_tools.fixtures import natural_image

    data = make_chartqa_json(tmp_path / "chartqa")
    (tmp_path / "images").mkdir()
    natural_image(0, (48, 40)).save(tmp_path / "images" / "a.png")
    ev = ["eval", "--model", str(saved), "--tasks", "chartqa", "--data", f"chartqa={data}", "--limit", "1"]
    ev += ["--num-workers", "0", "--out", str(tmp_path / "ev")]
    chat = ["chat", "Hi?", "--model", str(saved)]
    predict = ["predict", str(tmp_path / "images"), "--model", str(saved), "--out", str(tmp_path / "pred")]
    for args, expected in (
        ([*ev, "--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
        ([*ev, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        ([*ev, "--max-crops", "0"], "--max-crops must be >= 1, got 0"),
        ([*ev, "--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
        ([*ev, "--limit", "0"], "--limit must be >= 1, got 0"),
        ([*ev, "--data", "docvqa=/x"], "--data names task(s) ['docvqa']"),
        ([*chat, "--max-crops", "0"], "--max-crops must be >= 1, got 0"),
        ([*chat, "--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
        ([*predict, "--max-crops", "0"], "--max-crops must be >= 1, got 0"),
    ):
        code, err = _cli(args, monkeypatch, capsys)
        assert code == 2 and len(err) == 1 and expected in err[0], (args, err)
    assert not (tmp_path / "ev").exists() and not (tmp_path / "pred").exists()  # refused before any work


def test_predict_keys_every_image_by_its_file_name(saved, tmp_path, monkeypatch, capsys):  # noqa: F811
    import json

    from data_tools.fixtures import natural_image

    (tmp_path / "images").mkdir()
    for i, name in enumerate(("cat.png", "cat.jpg", "dog.png")):
        natural_image(i, (48, 40)).save(tmp_path / "images" / name)
    args = ["predict", str(tmp_path / "images"), "--model", str(saved), "--out", str(tmp_path / "pred")]
    code, _ = _cli([*args, "--question", "What?"], monkeypatch, capsys)
    rows = [json.loads(x) for x in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert code == 0 and [r["key"] for r in rows] == ["cat.jpg", "cat.png", "dog.png"]


def test_a_prompt_past_the_positions_is_refused(saved, monkeypatch, capsys, caplog):  # noqa: F811
    """A prompt past max_position_embeddings is refused; one leaving fewer positions than asked for
    gets its new-token budget capped, with a warning."""
    from mmsmall.inference.predictor import Predictor

    predictor = Predictor(str(saved))
    limit = predictor.model.llm.config.max_position_embeddings
    question = " ".join(["word"] * limit)
    code, err = _cli(["chat", question, "--model", str(saved)], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and f"max_position_embeddings={limit}" in err[0], err

    # a prompt that leaves a few positions: the 64 new tokens asked for are capped, with a warning
    words = 0
    while True:
        batch = predictor.collate([predictor.encode(None, " ".join(["word"] * words))])
        used = int(batch["position_ids"].max()) + 1
        if used >= limit - 8:
            break
        words += max(1, (limit - 8 - used) // 4)  # a word is at least one token: never far past
    assert used <= limit
    with caplog.at_level("WARNING"):
        assert isinstance(predictor.answer(batch, max_new_tokens=64), list)
    assert f"generating at most {limit - used + 1} new tokens, not 64" in caplog.text


def test_an_adapter_records_its_base_and_refuses_another(saved, tmp_path, monkeypatch, capsys):  # noqa: F811
    import json
    import shutil

    import torch

    from mmsmall.config import LoRAConfig, ModelConfig, load_config
    from mmsmall.errors import AdapterBaseMismatch
    from mmsmall.export.load import load_model, load_vlm
    from mmsmall.model.lora import adapter_base, inject_lora, merge_lora, save_adapter
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.tokenizer import build_tokenizer

    base = tmp_path / "base"
    shutil.copytree(saved, base)
    vlm = load_model(base).eval()
    inject_lora(vlm, LoRAConfig(enabled=True))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained adapter and connector: B is no longer zero
        for name, p in vlm.named_parameters():
            if "lora_B" in name or name.startswith("connector."):
                p.add_(0.05 * torch.randn_like(p))
    save_adapter(vlm, tmp_path / "adapters", base=base)
    meta = json.loads((tmp_path / "adapters" / "adapters.json").read_text())
    peft_cfg = json.loads((tmp_path / "adapters" / "llm" / "adapter_config.json").read_text())
    assert meta["base_model"] == peft_cfg["base_model_name_or_path"] == str(base)
    assert meta["layout"] == "mmsmall" and len(meta["base_fingerprint"]) == 64

    batch = {"input_ids": torch.tensor([[1, 5, 9, 13, 2]])}
    with torch.no_grad():
        want = merge_lora(vlm)(**batch).logits
        got = load_vlm(tmp_path / "adapters")[0](**batch).logits  # what chat / eval / export load
    assert (got - want).abs().max().item() < 1e-5

    other = tmp_path / "other"
    torch.manual_seed(2)
    cfg = load_config(ROOT / "configs/model/tiny-molmo2.yaml", cls=ModelConfig)
    VLM(cfg, build_tokenizer(cfg.tokenizer)).save_pretrained(other)
    with pytest.raises(AdapterBaseMismatch, match="load it onto the base it was trained on"):
        adapter_base(tmp_path / "adapters", base=other)
    shutil.rmtree(base)
    shutil.copytree(other, base)  # the recorded folder now holds another model
    code, err = _cli(["chat", "Hi?", "--model", str(tmp_path / "adapters")], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "trained on a base with weights fingerprint" in err[0], err
