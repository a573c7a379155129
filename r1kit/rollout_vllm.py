"""Optional vLLM rollout backend for GRPO on GPUs: the r1kit Engine's `generate` contract, served by vLLM.

Chosen with `rollout_backend = "vllm"` in a GRPO recipe; imported only then, never required
(`pip install r1kit[vllm]`). Same inputs and outputs as `r1kit.engine.Engine.generate`: prompt ids
in, `Generation(prompt_index, token_ids, logprobs, text, finish_reason)` out, prompt-major, with the
log-probability of each chosen token. vLLM's log-probs come from its own kernels (often bf16), so
they differ slightly from the training forward's; GRPO then recomputes pi_old itself (the loop
does so whenever the backend sets `recompute_old_logprobs`).

Weights: vLLM keeps its own copy. At start the policy is written to a temporary Hugging Face folder
that vLLM loads (colocated on the same GPU, `gpu_memory_utilization` sized to leave room for the
update); before each rollout `sync_weights` streams the policy's current tensors into vLLM's model
with `load_weights`, the same mechanism TRL's colocate mode uses. Under FSDP2 every rank's vLLM
gets the whole weights, gathered from the shards. vLLM itself is not exercised by r1kit's CPU tests
(the gathering is).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from r1kit.engine import Generation, SamplingParams
from r1kit.train.distributed import is_sharded


def _whole_state(model) -> dict:
    """The policy's state dict with whole tensors on every rank (under FSDP2, gathered from the shards)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


class VLLMEngine:
    recompute_old_logprobs = True

    def __init__(self, model, tokenizer, max_seq_len: int, gpu_memory_utilization: float = 0.3,
                 dtype: str = "bfloat16"):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ValueError("rollout_backend='vllm' needs vLLM on a CUDA machine (pip install 'r1kit[vllm]'); "
                             "or use rollout_backend='r1kit'") from err
        import r1kit
        from r1kit.model.hf import r1kit_to_hf

        self.tokenizer = tokenizer
        self._to_hf = r1kit_to_hf
        self._folder = tempfile.TemporaryDirectory(prefix="r1kit-vllm-")
        whole = model
        if is_sharded(model):  # FSDP2: this rank's vLLM loads the whole policy, gathered from the shards
            from r1kit.train.distributed import cpu_model

            whole = cpu_model(model.config, {k: v.cpu() for k, v in _whole_state(model).items()})
        r1kit.save(whole, tokenizer, Path(self._folder.name) / "policy")
        self.llm = LLM(model=str(Path(self._folder.name) / "policy"), dtype=dtype, max_model_len=max_seq_len,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)

    def sync_weights(self, model) -> None:
        """Copy the policy's current weights into vLLM (names as in the Hugging Face checkpoint)."""
        state = self._to_hf({k: v.detach() for k, v in _whole_state(model).items()}, model.config)
        engine = self.llm.llm_engine
        if hasattr(self.llm, "collective_rpc"):  # vLLM >= 0.8 (V1 engine)
            items = list(state.items())
            self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(items))
        else:
            engine.model_executor.driver_worker.model_runner.model.load_weights(state.items())
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        from vllm import SamplingParams as VLLMParams

        vp = VLLMParams(n=params.n, max_tokens=params.max_tokens, temperature=params.temperature,
                        top_p=params.top_p, top_k=params.top_k or -1, min_p=params.min_p,
                        stop=list(params.stop) or None, stop_token_ids=list(params.stop_token_ids) or None,
                        seed=params.seed, logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], vp, use_tqdm=False)
        out = []
        for i, request in enumerate(outputs):
            for c in request.outputs:
                logprobs = [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]
                out.append(Generation(i, list(c.token_ids), logprobs, c.text,
                                      "length" if c.finish_reason == "length" else "stop"))
        return out
