"""Exported GGUF in llama.cpp vs transformers and r1kit on tiny random models: tokenization, logits,
greedy tokens (transformers' full forward, r1kit's engine, llama.cpp).

Needs llama-cpp-python (a source build of several minutes on 2 cores; kept out of CI):
    pip install llama-cpp-python && HF_HUB_OFFLINE=1 python bench/gguf_llamacpp.py
"""
import json, sys, tempfile
from pathlib import Path
import numpy as np, torch

import r1kit
from r1kit.engine import Engine, SamplingParams
from r1kit.tokenizer import train_tokenizer, r1_prompt
from r1kit.export import export_gguf
from llama_cpp import Llama
from transformers import Qwen2Config, Qwen2ForCausalLM, LlamaConfig, LlamaForCausalLM

corpus = [f"Question {i}: what is {i*7} + {i*3}? The answer is {i*10}. Let me think step by step.\n" for i in range(500)]
results = {}
for kind in ("bpe", "char"):
    tok = train_tokenizer(corpus, vocab_size=420 if kind == "bpe" else None, kind=kind)
    for family, (C, M) in {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}.items():
        torch.manual_seed(0)
        cfg = C(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=tok.vocab_size, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False, rms_norm_eps=1e-6)
        model = M(cfg).eval()
        d = Path(tempfile.mkdtemp()) / f"tiny-{family}"
        model.save_pretrained(d); tok.save(d)
        out = export_gguf(d, dtype="f32")
        llm = Llama(model_path=str(out), n_ctx=512, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
        prompt = r1_prompt(tok, "Question 12: what is 84 + 36? Ünïcödé 😀  spaces\tand\nnewlines")
        ours = tok.encode(prompt)
        theirs = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        tok_ok = ours == theirs
        llm.reset(); llm.eval(ours)
        lc = np.array(llm.scores[: len(ours)])
        with torch.no_grad():
            hf = model(torch.tensor([ours])).logits[0].numpy()
        diff = float(np.abs(lc - hf).max())
        # greedy 24 tokens
        ids = list(ours); hf_gen = []
        with torch.no_grad():
            for _ in range(24):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax()); hf_gen.append(nxt); ids.append(nxt)
        llm.reset()
        lc_gen = []
        for t in llm.generate(ours, temp=0.0, top_k=1, reset=True):
            lc_gen.append(t)
            if len(lc_gen) == 24: break
        ours_model, _ = r1kit.load(d)
        r1_gen = Engine(ours_model, max_batch_size=1, max_seq_len=len(ours) + 32).generate(
            [ours], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].token_ids
        llm.close()
        key = f"{family}-{kind}"
        first = next((i for i, (a, b) in enumerate(zip(hf_gen, lc_gen)) if a != b), None)
        if first is not None:
            with torch.no_grad():
                row = model(torch.tensor([ours + hf_gen[:first]])).logits[0, -1]
            top2 = torch.topk(row, 2).values
            print(key, "diverges at", first, "hf top-2 margin", float(top2[0] - top2[1]), "hf", hf_gen[first], "llama.cpp", lc_gen[first])
        results[key] = {"tokenization_equal": tok_ok, "n_prompt_tokens": len(ours), "max_abs_logit_diff": diff,
                        "logit_scale": float(np.abs(hf).max()), "greedy_equal": hf_gen == lc_gen,
                        "r1kit_engine_greedy_equal_llamacpp": r1_gen == lc_gen}
        print(key, results[key], flush=True)
print(json.dumps(results))
