"""r1kit's CPU decode products (model/cpu_kernels.py): same values as torch's, used only where they
apply, repacked when the weights change, and everything still runs without them."""
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from r1kit.engine import Engine, SamplingParams
from r1kit.model import ModelConfig, Transformer, cpu_kernels
from r1kit.model.fuse import prepare_for_decode

needs_kernels = pytest.mark.skipif(cpu_kernels.library() is None,
                                   reason="needs an x86 CPU with AVX2 and a C compiler")


def _calls(monkeypatch) -> list[int]:
    """Count r1_gemm calls (rows of each)."""
    lib, seen = cpu_kernels.library(), []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            if name != "r1_gemm":
                return fn

            def gemm(*args):
                seen.append(args[1])
                return fn(*args)
            return gemm

    monkeypatch.setattr(cpu_kernels, "_LIB", Spy())
    return seen


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 31, 64])
@pytest.mark.parametrize("transposed", [False, True])
def test_packed_product_equals_linear(rows, transposed):
    torch.manual_seed(rows)
    out_f, in_f = 53, 40  # N not a multiple of the 24-column panels, K odd-sized
    w = torch.randn(out_f, in_f)
    if transposed:  # the engine's layout: (out, in) stored column-major (fuse.py)
        w = w.t().contiguous().t()
    b = torch.randn(out_f)
    x = torch.randn(rows, in_f)
    p = cpu_kernels.PackedWeight()
    with torch.inference_mode():
        for bias in (None, b):
            torch.testing.assert_close(p(x, w, bias), F.linear(x, w, bias), atol=1e-5, rtol=1e-5)
        xs = torch.randn(rows, 2 * in_f)[:, ::2]  # non-contiguous rows
        torch.testing.assert_close(p(xs, w, b), F.linear(xs, w, b), atol=1e-5, rtol=1e-5)
        x3 = torch.randn(rows, 1, in_f)  # (B, T, in) as a decode step passes it
        assert p(x3, w, b).shape == (rows, 1, out_f)


@needs_kernels
def test_repacks_when_the_weight_changes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 30)
    prepare_for_decode(torch.nn.Sequential(lin))
    cpu_kernels.attach(torch.nn.Sequential(lin))
    x = torch.randn(4, 32)
    with torch.inference_mode():
        before = cpu_kernels.project(lin, x)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an optimizer step: in place, the version counter moves
    with torch.inference_mode():
        after = cpu_kernels.project(lin, x)
        torch.testing.assert_close(after, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)
    lin.weight = torch.nn.Parameter(torch.randn(30, 32))  # a new tensor altogether
    with torch.inference_mode():
        torch.testing.assert_close(cpu_kernels.project(lin, x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_used_only_where_it_applies(monkeypatch):
    lin, lin64 = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8).double()
    cpu_kernels.attach(torch.nn.Sequential(lin, lin64))
    seen = _calls(monkeypatch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    x = torch.randn(4, 16)
    cpu_kernels.project(lin, x)  # gradients on: training stays on torch
    with torch.no_grad():
        cpu_kernels.project(lin, torch.randn(1, 16))  # one row on one thread: torch (as fast)
        cpu_kernels.project(lin, torch.randn(65, 16))  # many rows: torch
        cpu_kernels.project(lin64, x.double())  # not float32
        assert seen == []
        cpu_kernels.project(lin, x)
    assert seen == [4]


@needs_kernels
@pytest.mark.parametrize("preset", ["qwen2", "tiny"])
def test_decoding_with_and_without_kernels_agrees(preset, monkeypatch):
    torch.manual_seed(0)
    if preset == "qwen2":
        cfg = ModelConfig(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True)
    else:  # DeepSeek-V3: MLA (q_b, o), shared experts, untied head
        cfg = ModelConfig.preset("tiny", vocab_size=300)
    model = Transformer(cfg).eval()
    engine = Engine(model, max_batch_size=8)
    params = SamplingParams(n=3, max_tokens=12, temperature=0)
    seen = _calls(monkeypatch)
    ours = engine.generate([[1, 2, 3], [4, 5]], params)
    assert seen and max(seen) <= 6  # the packed products ran, on the batch's rows
    monkeypatch.setattr(cpu_kernels, "_LIB", None)  # as where the kernels cannot be built
    ref = engine.generate([[1, 2, 3], [4, 5]], params)
    assert [g.token_ids for g in ours] == [g.token_ids for g in ref]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@needs_kernels
@pytest.mark.parametrize("preset", ["qwen2", "tiny"])
def test_a_model_that_decoded_can_be_deep_copied(preset):
    """GRPO's reference model is copy.deepcopy(policy), and a policy may have decoded before (an
    evaluation first, as bench/r1zero.py does): its one-call decode plan holds a lock and pointers
    into its own packed weights: the copy leaves it behind (and plans again where it can), and decodes
    the same tokens."""
    import copy
    torch.manual_seed(0)
    if preset == "qwen2":
        cfg = ModelConfig(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:
        cfg = ModelConfig.preset("tiny", vocab_size=300)
    model = Transformer(cfg).eval()
    params = SamplingParams(n=2, max_tokens=8, temperature=0)
    ours = Engine(model, max_batch_size=8).generate([[1, 2, 3], [4, 5]], params)
    assert model.__dict__.get("_decode_stack") is not None  # the one-call path ran
    twin = copy.deepcopy(model)
    assert twin.__dict__.get("_decode_stack") is None
    theirs = Engine(twin, max_batch_size=8).generate([[1, 2, 3], [4, 5]], params)
    assert [g.token_ids for g in theirs] == [g.token_ids for g in ours]


def test_engine_packs_small_models_only(monkeypatch):
    cfg = ModelConfig(model_type="qwen2", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    if cpu_kernels.library() is None:
        model = Transformer(cfg)
        Engine(model)  # nothing to attach, nothing breaks
        assert "packed_weight" not in model.model.layers[0].self_attn.o_proj.__dict__
        return
    model = Transformer(cfg)
    Engine(model)
    assert isinstance(model.model.layers[0].self_attn.o_proj.__dict__.get("packed_weight"), cpu_kernels.PackedWeight)
    assert model.model.layers[0].mlp.fused.packed is not None
    model = Transformer(cfg)
    Engine(model, pack_weights=False)
    assert "packed_weight" not in model.model.layers[0].self_attn.o_proj.__dict__
    monkeypatch.setattr(cpu_kernels, "AUTO_BYTES", 1000)  # a model too big for the default
    model = Transformer(cfg)
    Engine(model)
    assert "packed_weight" not in model.model.layers[0].self_attn.o_proj.__dict__
    cpu_kernels.detach(model)  # safe on a model without copies


def test_unbuildable_kernels_warn_and_fall_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_LIB", None)
    monkeypatch.setattr(cpu_kernels, "_TRIED", False)
    monkeypatch.setenv("R1KIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match="CPU decode kernels unavailable"):
        assert cpu_kernels.library() is None
    assert list(tmp_path.iterdir()) == []  # no half-built library left behind
    lin = torch.nn.Linear(8, 4)
    assert cpu_kernels.attach(torch.nn.Sequential(lin)) is False
    with torch.no_grad():
        torch.testing.assert_close(cpu_kernels.project(lin, torch.ones(3, 8)), lin(torch.ones(3, 8)))
    monkeypatch.setattr(cpu_kernels, "_TRIED", False)
    monkeypatch.setenv("R1KIT_CPU_GEMM", "0")
    assert cpu_kernels.library() is None


def _library_built_by_a_compiler_refusing(flag: str, monkeypatch, tmp_path):
    """cpu_kernels.library() built afresh by a compiler that fails whenever given `flag`."""
    import shutil
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\ncase "$*" in *{flag}*) exit 1;; esac\nexec {shutil.which("cc") or shutil.which("gcc")} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setattr(cpu_kernels, "_LIB", None)
    monkeypatch.setattr(cpu_kernels, "_TRIED", False)
    monkeypatch.setattr(cpu_kernels, "_BF16", [False])
    monkeypatch.setenv("R1KIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.delenv("R1KIT_CPU_ISA", raising=False)
    return cpu_kernels.library()


@needs_kernels
def test_a_compiler_without_avx512_falls_back_to_the_avx2_build(monkeypatch, tmp_path):
    """On an AVX-512 CPU whose compiler cannot target AVX-512 (an old gcc), the AVX2 build is used."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    lib = _library_built_by_a_compiler_refusing("-mavx512f", monkeypatch, tmp_path)
    assert lib is not None and lib.nr == 24
    assert [f.name for f in (tmp_path / "cache").iterdir()][0].endswith("-avx2.so")
    w, x = torch.randn(30, 16), torch.randn(5, 16)
    with torch.inference_mode():
        torch.testing.assert_close(cpu_kernels.PackedWeight()(x, w, None), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_an_isa_this_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_LIB", None)
    monkeypatch.setattr(cpu_kernels, "_TRIED", False)
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("R1KIT_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="R1KIT_CPU_ISA='avx512'.*avx2"):
        cpu_kernels.library()


@needs_kernels
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="checks the AVX2 build on an AVX-512 CPU")
def test_the_avx2_build_agrees_too(tmp_path):
    """This CPU runs the AVX-512 build (48-column panels, 8-row tiles); an AVX2 CPU runs the other
    one (24, 4). Both come from one source: the AVX2 build's products and decode blocks, checked here."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, R1KIT_CPU_ISA="avx2", R1KIT_CACHE=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "packed_product_equals_linear or decode_stack_equals or fused_decode_block_equals"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert [f.name for f in tmp_path.iterdir() if f.suffix == ".so"][0].endswith("-avx2.so")


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_version_sees_every_optimizer_step(kind):
    """torch's fused AdamW updates parameters without bumping their version counter: updates.version
    counts optimizer steps too, so nothing derived from the weights goes stale unnoticed."""
    from r1kit.model.updates import version

    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, **{kind: True})
    before = version(lin.weight)
    lin(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert version(lin.weight) != before
    after = version(lin.weight)
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert version(lin.weight) != after


@needs_kernels
@pytest.mark.parametrize("preset", ["qwen2", "tiny"])
def test_packed_copies_follow_optimizer_steps(preset, monkeypatch):
    """GRPO's loop: generate, update the weights with fused AdamW, generate again. The second
    generation must use the new weights in every product (fused groups included)."""
    torch.manual_seed(0)
    if preset == "qwen2":
        cfg = ModelConfig(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True)
    else:
        cfg = ModelConfig.preset("tiny", vocab_size=300)
    model = Transformer(cfg)
    engine = Engine(model, max_batch_size=8)
    params = SamplingParams(n=3, max_tokens=8, temperature=0)
    engine.generate([[1, 2, 3], [4, 5]], params)  # packs
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model.train()
    model.loss(torch.randint(0, 300, (4, 12)))["loss"].backward()
    opt.step()
    ours = engine.generate([[1, 2, 3], [4, 5]], params)
    monkeypatch.setattr(cpu_kernels, "_LIB", None)
    ref = engine.generate([[1, 2, 3], [4, 5]], params)
    assert [g.token_ids for g in ours] == [g.token_ids for g in ref]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


def test_a_compiled_decode_step_has_no_graph_breaks_with_packed_copies_attached():
    """An engine compiled after an eager one packed the same model: the kernels' checks (and the
    version lookup, which Dynamo cannot trace) must stay out of the graph."""
    torch._dynamo.reset()
    cfg = ModelConfig(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True)
    model = Transformer(cfg).eval()
    prepare_for_decode(model)
    cpu_kernels.attach(model)
    cache = model.new_cache(2, 16)
    with torch.inference_mode():
        explained = torch._dynamo.explain(lambda ids, pos: model(ids, positions=pos, cache=cache, kv_len=16))(
            torch.tensor([[1], [2]]), torch.tensor([[3], [3]]))
    assert explained.graph_break_count == 0, [b.reason[:200] for b in explained.break_reasons]


def _random_model(model_type: str, **kw) -> Transformer:
    torch.manual_seed(0)
    if model_type == "deepseek_v3":  # MLA + a dense first layer + MoE layers
        cfg = ModelConfig.preset("tiny", vocab_size=300, **kw)
    else:
        kw = {"intermediate_size": 136, **kw}
        cfg = ModelConfig(model_type=model_type, vocab_size=300, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases: every term of the layer matters
            p.normal_(0, 0.2)
    return model


FAMILIES = {"qwen2": ("qwen2", dict(tie_word_embeddings=True)), "llama_o_bias": ("llama", dict(attention_bias=True)),
            "llama_untied": ("llama", dict(tie_word_embeddings=False)),
            "deepseek": ("deepseek_v3", {}), "deepseek_no_q_lora": ("deepseek_v3", dict(q_lora_rank=None)),
            "deepseek_bias_halves_rope": ("deepseek_v3", dict(attention_bias=True, rope_interleave=False))}


@needs_kernels
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_fused_decode_block_equals_the_torch_block(family, rows, monkeypatch):
    """cpu_kernels.decode_block: a block for one new token per row in C (dense: the whole block;
    DeepSeek: MLA absorbed, then the dense MLP in C or the MoE in torch). Same output and same cache
    writes as the block's torch code, rows at different positions, for every layer kind."""
    model_type, kw = FAMILIES[family]
    model = _random_model(model_type, **kw)
    Engine(model)  # fuses q|k|v (q_a|kv_a) and gate|up, packs the weights
    torch.manual_seed(1)
    S = 24
    positions = torch.tensor([[3 + 4 * i] for i in range(rows)])
    from r1kit.model.attention import cache_slots

    hidden = model.config.hidden_size
    slots = cache_slots(positions, S)
    kv_len = int(positions.max()) + 1
    for i, block in enumerate(model.model.layers):
        caches = [model.new_cache(rows, S) for _ in range(2)]
        for a, b in zip(caches[0].layers, caches[1].layers):  # earlier tokens in the cache: random
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                x.normal_()
                y.copy_(x)
        x = torch.randn(rows, 1, hidden)
        with torch.inference_mode():
            cos, sin = model.rotary.cos_sin(positions, x.dtype, bound=S)
            visible = (torch.arange(kv_len) <= positions.unsqueeze(-1)).unsqueeze(1)  # (rows, 1, 1, kv_len)
            mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
            fused = cpu_kernels.decode_block(block, x, model.rotary, cos, sin, caches[0].layers[i], slots, kv_len)
            assert fused is not None, f"layer {i} fell back to torch"
            monkeypatch.setattr(cpu_kernels, "FUSED_LAYERS", False)
            ref = block(x, model.rotary, cos, sin, mask, caches[1].layers[i], slots, kv_len)
            monkeypatch.setattr(cpu_kernels, "FUSED_LAYERS", True)
        torch.testing.assert_close(fused, ref, atol=2e-5, rtol=1e-5)
        ours, theirs = caches[0].layers[i], caches[1].layers[i]
        for a, b in zip(ours if isinstance(ours, tuple) else (ours,), theirs if isinstance(theirs, tuple) else (theirs,)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@needs_kernels
def test_fused_decode_block_runs_only_where_it_applies():
    model = _random_model("qwen2")
    Engine(model)
    block = model.model.layers[0]
    cache = model.new_cache(3, 16)
    positions = torch.tensor([[2], [5], [0]])
    from r1kit.model.attention import cache_slots

    slots = cache_slots(positions, 16)
    x = torch.randn(3, 1, 64)
    cos, sin = model.rotary.cos_sin(positions, x.dtype, bound=16)
    args = (cos, sin, cache.layers[0], slots, 6)
    assert cpu_kernels.decode_block(block, x, model.rotary, *args) is None  # gradients on: training stays on torch
    with torch.inference_mode():
        assert cpu_kernels.decode_block(block, x.double(), model.rotary, *args) is None  # not float32
        assert cpu_kernels.decode_block(block, torch.randn(3, 2, 64), model.rotary, *args) is None  # two new tokens: a prefill
        assert cpu_kernels.decode_block(block, torch.randn(65, 1, 64), model.rotary, *args) is None  # past the packed rows
        assert cpu_kernels.decode_block(block, x, model.rotary, *args) is not None
    odd = _random_model("qwen2", intermediate_size=100)  # not a multiple of the kernel's 8 floats
    Engine(odd)
    with torch.inference_mode():
        assert cpu_kernels.decode_block(odd.model.layers[0], x, odd.rotary, *args) is None


@needs_kernels
@pytest.mark.parametrize("family", ["qwen2", "deepseek"])
@pytest.mark.parametrize("path", ["block", "stack"])
def test_c_decode_refuses_a_slot_outside_its_row(family, path):
    """A position past the cache's end would write into the next row's slots: refused, nothing written,
    by one block (decode_block) and by every block in one call (decode_stack)."""
    model_type, kw = FAMILIES[family]
    model = _random_model(model_type, **kw)
    Engine(model)
    cache = model.new_cache(2, 8)
    x = torch.randn(2, 1, model.config.hidden_size)
    positions = torch.tensor([[3], [8]])
    cos, sin = model.rotary.cos_sin(positions, x.dtype, bound=16)
    slots = torch.tensor([3, 8 + 8])  # flat: row 0 position 3, row 1 position 8 of its 8 slots
    with torch.inference_mode(), pytest.raises(ValueError, match="outside their rows"):
        if path == "block":
            cpu_kernels.decode_block(model.model.layers[0], x, model.rotary, cos, sin, cache.layers[0], slots, 9)
        else:
            cpu_kernels.decode_stack(model, x, cos, sin, cache, slots, 9)
    assert all(t.abs().sum() == 0 for layer in cache.layers for t in _layer_tensors(layer))  # nothing written


def _layer_tensors(layer):
    return layer if isinstance(layer, tuple) else (layer,)


def _twin_caches(model, rows, S):
    """Two caches of `rows` rows and S slots holding the same random values."""
    caches = [model.new_cache(rows, S) for _ in range(2)]
    for a, b in zip(caches[0].layers, caches[1].layers):
        for x, y in zip(_layer_tensors(a), _layer_tensors(b)):
            x.normal_()
            y.copy_(x)
    return caches


def _decode_step_both_ways(model, rows, monkeypatch, S=24):
    """One decode step through Transformer.forward with the C paths on (the whole-model stack where
    it applies) and off (torch), from the same random cache: (logits, cache) of each."""
    torch.manual_seed(1)
    positions = torch.tensor([[3 + 4 * i] for i in range(rows)])
    ids = torch.randint(0, model.config.vocab_size, (rows, 1))
    caches = _twin_caches(model, rows, S)
    with torch.inference_mode():
        ours = model(ids, positions=positions, cache=caches[0], kv_len=int(positions.max()) + 1)
        monkeypatch.setattr(cpu_kernels, "FUSED_LAYERS", False)
        ref = model(ids, positions=positions, cache=caches[1], kv_len=int(positions.max()) + 1)
        monkeypatch.setattr(cpu_kernels, "FUSED_LAYERS", True)
    return (ours, caches[0]), (ref, caches[1])


STACK_FAMILIES = {**FAMILIES,
                  # group-limited routing (2 of 4 groups), scaled gates; softmax affinities without the bias
                  "deepseek_grouped": ("deepseek_v3", dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)),
                  "deepseek_softmax": ("deepseek_v3", dict(scoring_func="softmax", topk_method="greedy",
                                                           norm_topk_prob=False, n_shared_experts=0))}


@needs_kernels
@pytest.mark.parametrize("family", list(STACK_FAMILIES))
@pytest.mark.parametrize("rows", [1, 5])
def test_decode_stack_equals_the_torch_blocks_and_follows_changes(family, rows, monkeypatch):
    """cpu_kernels.decode_stack: every block of a model in one C call per step (a DeepSeek model's
    MoE routing in C too). Same logits and cache writes as torch's blocks; after in-place changes to
    a weight and to the balancing bias it packs and routes again, and after a layer is replaced by
    another kind it steps aside (the blocks run one by one)."""
    model_type, kw = STACK_FAMILIES[family]
    model = _random_model(model_type, **kw)
    moes = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    with torch.no_grad():
        for gate in moes:
            gate.e_score_correction_bias.normal_(0, 0.3)
    Engine(model)
    lib, calls = cpu_kernels.library(), []
    kind = "mla" if model.config.is_mla else "dense"
    layers_arg = {f"r1_{kind}_decode_stack": 3, f"r1_{kind}_decode_step": 1}  # the stack alone, or the whole step

    class Spy:
        def __getattr__(self, attr):
            fn = getattr(lib, attr)
            if attr not in layers_arg:
                return fn

            def stack(*args):
                calls.append(args[layers_arg[attr]])  # layers in the call
                return fn(*args)
            return stack

    monkeypatch.setattr(cpu_kernels, "_LIB", Spy())

    def agree():
        (ours, oc), (ref, rc) = _decode_step_both_ways(model, rows, monkeypatch)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        for a, b in zip(oc.layers, rc.layers):
            for x, y in zip(_layer_tensors(a), _layer_tensors(b)):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)

    agree()
    assert calls == [model.config.num_hidden_layers]
    with torch.no_grad():  # in-place writes: the plan's fingerprint changes, the weights are packed again
        model.model.layers[1].self_attn.o_proj.weight.mul_(-2.0)
        model.model.layers[0].self_attn.fused.linears[0].weight.add_(0.5)
        for gate in moes:
            gate.e_score_correction_bias.neg_()
    agree()
    assert len(calls) == 2
    old = model.model.layers[1].self_attn.o_proj
    model.model.layers[1].self_attn.o_proj = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    agree()
    assert len(calls) == 2  # the stack stepped aside; the blocks ran one by one


@needs_kernels
@pytest.mark.parametrize("family", ["qwen2", "llama_untied", "deepseek"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_decode_step_draws_as_the_sampler_does(family, temperature):
    """cpu_kernels.decode_step with a temperature: embedding, blocks, head and the draw in one C call.
    Its tokens and log-probabilities equal engine.sample's on the model's logits with the generator in
    the same state (one uniform number per row), greedy too, and the cache writes equal the model's."""
    from r1kit.engine import sample

    model_type, kw = FAMILIES[family]
    model = _random_model(model_type, **kw)
    Engine(model)
    B, S = 16, 24
    positions = torch.randint(0, S, (B, 1))
    ids = torch.randint(0, model.config.vocab_size, (B, 1))
    caches = _twin_caches(model, B, S)
    kv_len = int(positions.max()) + 1
    with torch.inference_mode():
        logits = model(ids, positions=positions, cache=caches[0], kv_len=kv_len)[:, -1]
        ref = sample(logits, temperature, generator=torch.Generator().manual_seed(3))
        ours = cpu_kernels.decode_step(model, ids, positions, caches[1], kv_len, temperature,
                                       torch.Generator().manual_seed(3))
    assert ours is not None
    assert torch.equal(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(caches[0].layers, caches[1].layers):
        for x, y in zip(_layer_tensors(a), _layer_tensors(b)):
            torch.testing.assert_close(x, y, atol=0, rtol=0)


@needs_kernels
def test_decode_step_names_bad_ids_and_positions():
    """A token id outside the vocabulary, a position outside the cache: a clear error, nothing run."""
    model = _random_model("qwen2")
    Engine(model)
    cache = model.new_cache(2, 8)
    with torch.inference_mode():
        with pytest.raises(IndexError, match="outside the vocabulary of 300"):
            cpu_kernels.decode_step(model, torch.tensor([[1], [300]]), torch.tensor([[0], [1]]), cache, 2)
        with pytest.raises(ValueError, match="outside the cache"):
            cpu_kernels.decode_step(model, torch.tensor([[1], [2]]), torch.tensor([[0], [8]]), cache, 8)


@needs_kernels
@pytest.mark.parametrize("family", ["qwen2", "llama_o_bias", "deepseek"])
def test_decoding_with_fused_blocks_agrees_and_follows_optimizer_steps(family, monkeypatch):
    """The engine decodes through the C blocks, each step (embedding to the chosen token) in one C
    call; greedy tokens and log-probabilities equal the torch path's, before and after an optimizer
    step (GRPO's loop). (Drawn tokens: test_decode_step_draws_as_the_sampler_does. Across the two
    paths, whose logits differ by ~1e-5, a draw near a boundary of the cumulative sum can flip.)"""
    model_type, kw = FAMILIES[family]
    model = _random_model(model_type, **kw)
    engine = Engine(model, max_batch_size=8)
    params = SamplingParams(n=3, max_tokens=10, temperature=0)
    lib, calls, names = cpu_kernels.library(), [], set()

    class Spy:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            if name not in ("r1_dense_decode_step", "r1_mla_decode_step"):
                return fn

            def layer(*args):
                calls.append(args[1])
                names.add(name)
                return fn(*args)
            return layer

    for step in range(2):
        if step:
            opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
            model.train()
            model.loss(torch.randint(0, 300, (4, 12)))["loss"].backward()
            opt.step()
            model.eval()
        monkeypatch.setattr(cpu_kernels, "_LIB", Spy())
        calls.clear()
        ours = engine.generate([[1, 2, 3], [4, 5]], params)
        assert calls and set(calls) == {model.config.num_hidden_layers}  # every layer, every decode step
        # every step in one call (cpu_kernels.decode_step around DenseStack, MLAStack)
        assert names == ({"r1_mla_decode_step"} if family == "deepseek" else {"r1_dense_decode_step"})
        monkeypatch.setattr(cpu_kernels, "FUSED_LAYERS", False)
        ref = engine.generate([[1, 2, 3], [4, 5]], params)
        monkeypatch.setattr(cpu_kernels, "FUSED_LAYERS", True)
        assert [g.token_ids for g in ours] == [g.token_ids for g in ref]
        for a, b in zip(ours, ref):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@needs_kernels
def test_moe_in_training_mode_stays_on_torch_and_counts_expert_load():
    """The balancing bias is updated from the experts' load, counted by training-mode forwards: the C
    MoE half steps aside for them."""
    model_type, kw = FAMILIES["deepseek"]
    model = _random_model(model_type, **kw)
    Engine(model)
    model.train()
    block = model.model.layers[1]  # a MoE layer
    cache = model.new_cache(3, 16)
    positions = torch.tensor([[2], [5], [0]])
    from r1kit.model.attention import cache_slots

    x = torch.randn(3, 1, model.config.hidden_size)
    cos, sin = model.rotary.cos_sin(positions, x.dtype, bound=16)
    with torch.inference_mode():
        out = cpu_kernels.decode_block(block, x, model.rotary, cos, sin, cache.layers[1], cache_slots(positions, 16), 6)
    assert out is not None and block.mlp.expert_load.sum() == 3 * model.config.num_experts_per_tok


needs_amx = pytest.mark.skipif(cpu_kernels.library() is None or not cpu_kernels.library().amx,
                               reason="needs a CPU with AMX (bf16 tiles) and a compiler for it")


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 64])
def test_amx_products_equal_bf16_rounded_inputs(rows):
    """In bf16 mode (within precision.bf16_matmuls) the products run on AMX: x and W rounded to bf16,
    sums in float32. K and N not multiples of the 32 x 32 blocks, rows not of the 16-row tiles."""
    from r1kit.model import precision
    torch.manual_seed(rows)
    w, b = torch.randn(53, 72).t().contiguous().t(), torch.randn(53)  # the engine's layout (fuse.py)
    x = torch.randn(rows, 72)
    p = cpu_kernels.PackedWeight()
    ref = x.bfloat16().float() @ w.bfloat16().float().t() + b
    with torch.inference_mode():
        with precision.bf16_matmuls():
            got = p(x, w, b)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got, F.linear(x, w, b), atol=1e-5, rtol=0)  # it did round
        torch.testing.assert_close(p(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)  # float32 again: repacked


@needs_amx
@pytest.mark.parametrize("family", ["qwen2", "llama_o_bias", "deepseek"])
def test_amx_decode_stack_agrees_with_the_blocks_and_with_float32(family, monkeypatch):
    """bf16 mode through the whole-model C stack: the same values as the C blocks one by one and (a
    dense model) as torch's blocks on the packed products, all in bf16 mode; close to float32;
    float32 again after."""
    from r1kit.model import precision
    model_type, kw = FAMILIES[family]
    model = _random_model(model_type, **kw)
    Engine(model)
    with precision.bf16_matmuls():
        (stack, _), (torch_blocks, _) = _decode_step_both_ways(model, 5, monkeypatch)
        monkeypatch.setattr(cpu_kernels, "STACKED", False)
        (c_blocks, _), _ = _decode_step_both_ways(model, 5, monkeypatch)
        monkeypatch.setattr(cpu_kernels, "STACKED", True)
    torch.testing.assert_close(stack, c_blocks, atol=1e-5, rtol=1e-5)
    if not model.config.is_mla:  # torch's MLA and MoE decode run some products of their own, in float32
        torch.testing.assert_close(stack, torch_blocks, atol=1e-4, rtol=1e-4)
    (ours, _), (ref, _) = _decode_step_both_ways(model, 5, monkeypatch)  # float32 again: packed again
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    err = (stack - ref).abs().max()
    assert 0 < err < 0.05 * ref.abs().max(), err


@needs_amx
def test_a_compiler_without_amx_falls_back_to_the_avx512_build(monkeypatch, tmp_path):
    lib = _library_built_by_a_compiler_refusing("-mamx-tile", monkeypatch, tmp_path)
    assert lib is not None and lib.nr == 48 and not lib.amx
    assert [f.name for f in (tmp_path / "cache").iterdir()][0].endswith("-avx512.so")
    from r1kit.model import precision
    w, x = torch.randn(30, 16), torch.randn(5, 16)
    with torch.inference_mode(), precision.bf16_matmuls():  # no AMX: float32 products
        torch.testing.assert_close(cpu_kernels.PackedWeight()(x, w, None), F.linear(x, w), atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("halves", [True, False])
@pytest.mark.parametrize("width", [768, 83])  # whole AVX2 vectors, and a tail
def test_swiglu_equals_torch_forward_and_backward(halves, width):
    """Training's SwiGLU in one C pass each way: silu(gate) * up as torch computes it, and the gradient
    of a gate|up product as one tensor."""
    torch.manual_seed(0)
    gu = (torch.randn(6, 37, 2 * width) * 4).requires_grad_()  # large values too: sigmoid's both tails
    ref_in = gu.detach().clone().requires_grad_()
    if halves:
        h = cpu_kernels.swiglu(gu)
    else:  # two tensors, each a strided view of gu
        h = cpu_kernels.swiglu(gu[..., :width], gu[..., width:])
    ref = F.silu(ref_in[..., :width]) * ref_in[..., width:]
    dh = torch.randn_like(ref)
    h.backward(dh)
    ref.backward(dh)
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gu.grad, ref_in.grad, rtol=1e-5, atol=1e-5)


def test_swiglu_small_or_other_dtypes_stay_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels._SwiGLU, "apply", lambda *a: calls.append(1))
    cpu_kernels.swiglu(torch.randn(2, 8))  # too small to pay for a call
    cpu_kernels.swiglu(torch.randn(64, 512, dtype=torch.bfloat16))
    assert calls == []


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("width,strided", [(256, False), (83, False), (64, True)])
def test_rms_norm_equals_torch_forward_and_backward(width, strided, threads):
    """One C pass each way, as F.rms_norm: a tail past whole vectors, a strided input (MLA's c_kv, a
    slice of its kv_a product), and the weight's gradient summed over two threads' rows."""
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = (torch.randn(5, 41, width + 16 if strided else width) * 3).requires_grad_()
        w = torch.randn(width, requires_grad=True)
        base2, w2 = base.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = cpu_kernels.rms_norm(base[..., :width], w, 1e-6)
        ref = F.rms_norm(base2[..., :width], (width,), w2, 1e-6)
        dy = torch.randn_like(ref)
        y.backward(dy)
        ref.backward(dy)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base.grad, base2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("interleave", [False, True])
def test_rope_equals_torch_forward_and_backward(interleave, monkeypatch):
    """layers.Rotary.apply in one C pass each way, on a strided view (a slice of each head, as MLA's
    rope part of q), both layouts (DeepSeek's interleaved pairs)."""
    from r1kit.model.layers import Rotary

    torch.manual_seed(0)
    rot = Rotary(ModelConfig.preset("tiny"), 16, interleave)
    cos, sin = rot.cos_sin(torch.arange(30).unsqueeze(0).expand(4, 30), torch.float32)
    base = torch.randn(4, 30, 6, 40, requires_grad=True)
    base2 = base.detach().clone().requires_grad_()
    y = rot.apply(base[..., 8:24], cos, sin)
    monkeypatch.setattr(cpu_kernels, "ROPE_MIN_ELEMENTS", 1 << 62)  # torch's ops
    ref = rot.apply(base2[..., 8:24], cos, sin)
    dy = torch.randn_like(ref)
    y.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(base.grad, base2.grad, rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("k", [1, 2, 3])
def test_moe_dispatch_and_combine_in_c_equal_torch(k, monkeypatch):
    """moe._PermuteRows (dispatch: token order[p] // k to pair p) and moe.combine (each token's k pair
    outputs weighted by its gates, summed) in C, forward and backward, against the torch ops they replace."""
    from r1kit.model import moe

    torch.manual_seed(0)
    N, H = 37, 20  # H not a multiple of the vector width: the tails too
    order = torch.randperm(N * k)
    inverse = order.argsort()
    x = torch.randn(N, H, requires_grad=True)
    gates = torch.rand(N, k, requires_grad=True)
    xs = moe._PermuteRows.apply(x, order, inverse, k)
    out = moe.combine(xs * 2.0 + 1.0, inverse, order, gates)
    dy = torch.randn(N, H)
    grads = torch.autograd.grad(out, [x, gates], dy)
    monkeypatch.setattr(moe, "_rows_in_c", lambda *t: False)  # torch's index_select, product and sum
    xs_ref = moe._PermuteRows.apply(x, order, inverse, k)
    ref = moe.combine(xs_ref * 2.0 + 1.0, inverse, order, gates)
    ref_grads = torch.autograd.grad(ref, [x, gates], dy)
    torch.testing.assert_close(xs, xs_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_cross_entropy_in_c_equals_torch():
    """cpu_kernels.cross_entropy: per-row losses and their gradient (weighted rows, as the masked mean
    of Transformer.loss) equal F.cross_entropy's; a target outside the vocabulary is a clear error."""
    torch.manual_seed(0)
    for N, V in ((40, 301), (64, 512)):
        x = (torch.randn(N, V) * 4).requires_grad_()
        t, w = torch.randint(0, V, (N,)), torch.rand(N)
        loss = cpu_kernels.cross_entropy(x, t)
        ref = F.cross_entropy(x, t, reduction="none")
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        g, = torch.autograd.grad((loss * w).sum(), x)
        g_ref, = torch.autograd.grad((ref * w).sum(), x)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError, match=r"target ids \[512\] outside the vocabulary of 512"):
        cpu_kernels.cross_entropy(torch.randn(64, 512), torch.full((64,), 511).index_fill_(0, torch.tensor([3]), 512))


@needs_kernels
def test_moe_dispatch_plan_in_c_equals_the_sorts(monkeypatch):
    """moe.dispatch_plan by one counting pass (r1_moe_plan): the same stable order, inverse and counts as
    argsort's, experts without tokens included; an id outside the experts is a clear error."""
    from r1kit.model import moe

    flat = torch.randint(0, 7, (301,))
    flat[flat == 3] = 5  # expert 3 gets nothing
    got = moe.dispatch_plan(flat, 8)
    monkeypatch.setattr(moe, "library", lambda: None)
    ref = moe.dispatch_plan(flat, 8)
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    monkeypatch.undo()
    with pytest.raises(IndexError, match="outside 0..7"):
        moe.dispatch_plan(torch.tensor([1, 8]), 8)
