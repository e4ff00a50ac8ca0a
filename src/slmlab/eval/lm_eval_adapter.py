"""lm-evaluation-harness model `slmlab`: any task of the harness on an slmlab model.

    python -m slmlab.eval ckpt=last.ckpt suite=lm_eval tasks=hellaswag,arc_easy

or from Python, after importing this module (which registers the name):

    lm_eval.simple_evaluate(model="slmlab", model_args="ckpt=last.ckpt,tokenizer=tokenizer.json,batch_size=16", ...)

The harness (0.4.x) finds models by name only once their module is imported: it has no plugin
entry point for models, so its `lm_eval` command knows `slmlab` only when started as

    python -c "import slmlab.eval.lm_eval_adapter, lm_eval.__main__ as m; m.cli_evaluate()" \
        run --model slmlab --model_args ckpt=DIR_OR_CKPT,tokenizer=tokenizer.json --batch_size 16 --tasks ...

(`python -m slmlab.eval` imports this module itself). Scores use `scoring.py` (contexts start
at `<|endoftext|>`); generation is greedy, `batch_size` requests at a time, cut at the request's
`until` strings, `<|endoftext|>` or `<|im_end|>`.
"""

import logging
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from slmlab.eval.scoring import encode, encode_pair, score_continuations
from slmlab.export.load import load_pretrained
from slmlab.export.tokenizer import EOS, IM_END, TokenizerFiles
from slmlab.models import CausalLM
from slmlab.models.generate import generate_prompts

log = logging.getLogger(__name__)


@register_model("slmlab")
class SlmlabLM(TemplateLM):
    """ckpt: a .ckpt, a folder `load_pretrained` reads, or a loaded model (as lm-eval's `hf` model
    takes one); tokenizer: its tokenizer.json, by default the one inside a ckpt folder.
    `max_batch_size` is accepted because the harness passes it; batches have a fixed size. `cuda_graph`:
    decode from CUDA graphs on CUDA (not under FSDP, whose parameter gathers a graph cannot hold)."""

    def __init__(self, ckpt: str | CausalLM, tokenizer: str | None = None, batch_size: int | str = 16,
                 device: str | None = None, max_gen_toks: int = 256, max_batch_size: int | None = None,
                 cuda_graph: bool = True) -> None:
        super().__init__()
        if tokenizer is None and not (isinstance(ckpt, str) and Path(ckpt).is_dir()):
            raise ValueError("tokenizer=<tokenizer.json> is needed unless ckpt is an exported folder holding one")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a number of at least 1 (no automatic batch size)")
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # the harness's command line asks for cuda unless told otherwise
                log.warning("device=%s is not available: evaluating on the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device, self.cuda_graph = torch.device(device), cuda_graph
        self.model = (load_pretrained(ckpt) if isinstance(ckpt, str) else ckpt).to(self._device).eval()
        files = TokenizerFiles.load(tokenizer or ckpt)
        files.check_fits(self.model.cfg.vocab_size)
        if files.token_id(EOS) is None:
            raise ValueError(f"{files.path} has no {EOS} token: not an slmlab tokenizer")
        self.tokenizer = files.tokenizer
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        self.max_length = self.model.cfg.max_seq_len

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.token_to_id(EOS)

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The EOS start-of-document token is the only special token, added unless told not to."""
        return encode(self.tokenizer, string, start_of_document=add_special_tokens is not False)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tokenizer, context, continuation)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size)
        results = [(s.logprob, s.greedy) for s in scores]
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of at most max_seq_len predicted tokens."""
        results = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.eot_token_id,
                max_seq_len=self.max_length, context_len=1)]
            results.append(sum(s.logprob for s in score_continuations(self.model, windows, self.batch_size)))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), results[-1])
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context (sampling arguments are ignored), `batch_size` contexts
        decoded together, cut before the first stop string; special tokens are decoded as text so that
        they can be stops."""
        jobs = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            # an empty stop string would cut every text to nothing (and `str.split` refuses it)
            until = [stop for stop in ([until] if isinstance(until, str) else until) if stop]
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            jobs.append((self.tok_encode(context)[-max(1, self.max_length - max_new):], max_new,
                         until + [EOS, IM_END]))  # the end of a document, of a chat turn
        results = [""] * len(jobs)
        for max_new in sorted({max_new for _, max_new, _ in jobs}):
            index = [i for i, job in enumerate(jobs) if job[1] == max_new]
            seqs = generate_prompts(self.model, [jobs[i][0] for i in index], max_new, stop_id=self.eot_token_id,
                                    max_rows=self.batch_size, temperature=0, cuda_graph=self.cuda_graph)
            for i, seq in zip(index, seqs):
                prompt, _, until = jobs[i]
                text = self.tokenizer.decode(seq[0, len(prompt):].tolist(), skip_special_tokens=False)
                results[i] = min((text.split(stop)[0] for stop in until), key=len)
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results
