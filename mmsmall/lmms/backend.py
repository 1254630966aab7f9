"""An lmms-eval model backend for mmsmall model folders: ``lmms_eval --model mmsmall``.

lmms-eval finds it through the ``lmms_eval.models`` entry point our package declares
(``pip install 'mmsmall[lmms]'``). It answers ``generate_until`` requests (lmms-eval's "simple"
model protocol: ``Instance.args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``)
through the serving :class:`~mmsmall.serve.engine.Engine` (requests join a running batch), with
the prompt encoding of :class:`~mmsmall.inference.predictor.Predictor`, so its answers are those
``mmsmall eval`` gives.

``--model_args``: ``pretrained`` (the model folder, any that ``mmsmall eval --model`` takes),
``device``, ``dtype`` (fp32 | bf16 | fp16), ``max_crops``, ``batch_size`` (requests decoding
together), ``style`` (a Molmo task style such as ``chart_qa``; default none, as ``mmsmall eval``'s
lmms-eval prompts), ``max_new_tokens`` (used when a task gives none).
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image


class MmsmallLMM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "fp32",
        max_crops: int | None = None,
        batch_size: int | str = 8,
        style: str | None = None,
        max_new_tokens: int = 128,
        max_batch_size: int | None = None,  # lmms-eval passes it; the engine's batch is batch_size
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"mmsmall backend: unknown model_args {sorted(unknown)}; valid: pretrained, device, dtype, "
                "max_crops, batch_size, style, max_new_tokens"
            )
        import torch

        from mmsmall.inference.predictor import Predictor, check_options
        from mmsmall.serve.engine import Engine

        max_crops = None if max_crops in (None, "", "None") else int(max_crops)
        if not str(batch_size).isdigit():
            raise ValueError(
                f"mmsmall backend: --batch_size {batch_size!r}; give a number (auto is not supported)"
            )
        self.batch_size_per_gpu = int(batch_size)
        check_options(max_crops=max_crops, batch_size=self.batch_size_per_gpu)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.predictor = Predictor(pretrained, device=device, max_crops=max_crops, dtype=dtype)
        self.engine = Engine(self.predictor, max_batch=self.batch_size_per_gpu, max_queue=1 << 30)
        self.style = style or None
        self.default_max_new_tokens = int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.predictor.device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        from mmsmall.serve.engine import Request

        jobs = []
        for instance in tqdm(requests, desc="mmsmall: encoding", disable=not requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
            image = self._image(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id)
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature") or 0.0)
            do_sample = bool(kwargs.get("do_sample")) and temperature > 0
            job = Request(
                self.predictor.encode(image, context, task=self.style),
                max_new_tokens=int(kwargs.get("max_new_tokens") or self.default_max_new_tokens),
                do_sample=do_sample,
                temperature=temperature if do_sample else 1.0,
                top_p=float(kwargs.get("top_p") or 1.0),
                stop=tuple(until),
            )
            jobs.append(self.engine.fit(job))
        done = self.engine.generate(jobs)
        answers = [self.engine.text(job) for job in done]
        for instance, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", (instance.args[0], instance.args[1]), answer)
        return answers

    def _image(self, visuals, task: str, doc_id):
        """The request's images: None (text only), one image, or a list asked about together in order."""
        flat = []
        for v in visuals or []:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        for v in flat:
            if not isinstance(v, Image.Image):
                raise NotImplementedError(
                    f"mmsmall backend: task {task!r} doc {doc_id} gives a {type(v).__name__} visual "
                    "(video or audio); mmsmall models take images"
                )
        images = [v.convert("RGB") for v in flat]
        return None if not images else images[0] if len(images) == 1 else images

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``Instance.args = (context, continuation or doc_to_target, doc_to_visual, doc_id, task,
        split)`` -> (sum of the continuation tokens' log-probabilities after the prompt, whether
        greedy decoding would give exactly those tokens). The continuation is tokenized on its own,
        as lmms-eval's Hugging Face backends do."""
        out = []
        for instance in requests:
            context, target, doc_to_visual, doc_id, task, split = instance.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            image = self._image(doc_to_visual(doc), task, doc_id)
            tokens = self.predictor.tokenizer.encode(continuation, add_special_tokens=False)
            if not tokens:
                raise ValueError(f"mmsmall backend: task {task!r} doc {doc_id}: an empty continuation")
            example = self.predictor.encode(image, context, task=self.style)
            out.append(continuation_logprob(self.predictor, example, tokens))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), out[-1])
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mmsmall backend: multi-round generation is not supported")


def continuation_logprob(predictor, example: dict, tokens: list[int]) -> tuple[float, bool]:
    """Log-probability of ``tokens`` following the encoded prompt ``example``, and whether each is
    the argmax: the prompt prefilled into a KV cache, the continuation fed in one decode pass."""
    import torch
    from transformers import DynamicCache

    from mmsmall.serve.engine import prefill_inputs

    model = predictor.model
    with torch.no_grad():
        on = prefill_inputs(predictor.collate([example]), model.device)
        cache = DynamicCache(config=model.llm.config)
        first, allowed = model.prefill(**on, cache=cache, use_cache=True, logits_to_keep=1)
        cont = torch.tensor([tokens], device=model.device)  # (1, C)
        logits = first.logits[:, -1:]  # (1, 1, V): predicts the first continuation token
        if len(tokens) > 1:
            n = len(tokens) - 1
            keys = torch.cat(
                [allowed[:, 0, -1, :], torch.ones(1, n, dtype=torch.bool, device=model.device)], 1
            )
            positions = on["position_ids"][:, -1:] + 1 + torch.arange(n, device=model.device)  # (1, C-1)
            rest = model.decode(cont[:, :-1], keys, positions, cache).logits  # (1, C-1, V)
            logits = torch.cat([logits, rest], 1)
        logits = model.emittable(logits.float())  # (1, C, V)
        logp = torch.log_softmax(logits, -1).gather(-1, cont[..., None]).sum()
        return float(logp), bool((logits.argmax(-1) == cont).all())
