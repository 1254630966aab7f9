"""The eval runner drives encode / collate / answer; a model with only ``predict`` runs through
``PredictAdapter``; the corrupt samples a task's loader skipped are a field of its result."""

from __future__ import annotations

import io

from PIL import Image

from data_tools.shards import ShardWriter
from eval.runner import Answerer, PredictAdapter, as_answerer, evaluate, load_task


class Echo:
    """Answers every question with the image width (a model that only has ``predict``)."""

    def predict(self, images, questions, max_new_tokens, task=None):
        return [str(im.size[0]) for im in images]


def _shards(out):
    with ShardWriter(out, prefix="held", max_count=10) as w:
        for i in range(5):
            buf = io.BytesIO()
            Image.new("RGB", (20 + i, 16), (i * 40, 90, 200)).save(buf, "PNG")
            data = buf.getvalue()[:30] if i == 3 else buf.getvalue()  # sample 3: a truncated PNG
            msgs = [{"role": "user", "content": "How wide?"}, {"role": "assistant", "content": str(20 + i)}]
            w.write(f"held_{i:03d}", data, "png", {"id": f"h{i}", "task": "chart_qa", "messages": msgs})
    return out


def test_a_predict_only_model_is_adapted_and_skips_are_a_result_field(tmp_path):
    from eval.tasks.base import get_task

    data = {"synth_charts": str(_shards(tmp_path / "shards"))}
    assert not isinstance(Echo(), Answerer) and isinstance(as_answerer(Echo()), PredictAdapter)
    loaded = load_task(get_task("synth_charts"), data["synth_charts"], None)
    assert loaded.skipped == {"bad_image": 1} and "skipped" not in loaded.records[0].meta
    res = evaluate(Echo(), ["synth_charts"], tmp_path / "out", data=data, num_workers=1, show_progress=False)
    task = res["tasks"]["synth_charts"]
    assert task["n"] == 4 and task["skipped_corrupt"] == {"bad_image": 1}
    assert task["score"] == 100.0  # every width read back through the adapter's batches
