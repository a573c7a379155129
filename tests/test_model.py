"""The model family: parity with transformers, caches, MLA absorption, MoE dispatch, balancing, MTP."""
import json
import warnings

import pytest
import torch

import r1kit
from r1kit.model import ModelConfig, Transformer
from r1kit.model.attention import cache_slots
from r1kit.model.moe import MoE

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")


def _ds_config(**kw):
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                max_position_embeddings=256)
    base.update(kw)
    return transformers.DeepseekV3Config(**base)


def _hf_models():
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}))
    ds = transformers.DeepseekV3ForCausalLM(_ds_config(rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}))
    ds_lite = transformers.DeepseekV3ForCausalLM(_ds_config(q_lora_rank=None, n_group=1, topk_group=1))
    with torch.no_grad():  # a non-zero balancing bias must change the choice of experts the same way
        for m in (ds, ds_lite):
            for layer in m.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return {"qwen2": qwen, "llama": llama, "deepseek_v3": ds, "deepseek_v3_no_q_lora": ds_lite}


@pytest.fixture(scope="module")
def hf_models():
    return {k: m.eval() for k, m in _hf_models().items()}


@pytest.mark.parametrize("name", ["qwen2", "llama", "deepseek_v3", "deepseek_v3_no_q_lora"])
def test_logits_parity_with_transformers_both_ways(hf_models, name, tmp_path):
    hf_model = hf_models[name]
    hf_model.save_pretrained(tmp_path / "hf")
    ours, _ = r1kit.load(tmp_path / "hf")
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids)
    assert got.shape == (2, 24, 96)
    assert (got - ref).abs().max().item() <= 1e-4
    # r1kit's folder loads in transformers unchanged and gives the same logits
    r1kit.save(ours, None, tmp_path / "ours")
    back = type(hf_model).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(ids).logits - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2", "llama", "deepseek_v3"])
def test_training_loss_and_gradients_equal_transformers(hf_models, name, tmp_path):
    """Model.loss and its gradient on every weight (grouped-query attention through SDPA's own
    grouping, MLA, MoE; next-token targets read from the logits in place) equal transformers' own
    loss and backward on the same weights."""
    hf_model = hf_models[name]
    hf_model.save_pretrained(tmp_path / "hf")
    ours, _ = r1kit.load(tmp_path / "hf")
    ours.train()
    hf_train = type(hf_model).from_pretrained(tmp_path / "hf").train()
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 20)
    mask[1, 12:] = 0  # a shorter row: its tail is not scored
    labels = ids.masked_fill(mask == 0, -100)
    got = ours.loss(ids, mask)["lm_loss"]
    ref = hf_train(input_ids=ids, labels=labels).loss
    assert abs(got.item() - ref.item()) <= 1e-5
    got.backward()
    ref.backward()
    theirs = dict(hf_train.named_parameters())
    compared = 0
    for n, p in ours.named_parameters():
        q = theirs.get(n)
        if q is None or q.grad is None:
            continue
        assert p.grad is not None, n
        assert (p.grad - q.grad).abs().max().item() <= 1e-5 * max(1.0, q.grad.abs().max().item()), n
        compared += 1
    assert compared == len(theirs)  # every weight has a gradient on both sides


def test_saved_deepseek_config_carries_deepseek_keys(tmp_path):
    model = Transformer(ModelConfig.preset("tiny"))
    r1kit.save(model, None, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ("scoring_func", "topk_method", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
                "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "n_routed_experts", "first_k_dense_replace",
                "num_nextn_predict_layers", "moe_layer_freq", "rope_theta", "rope_scaling"):
        assert key in cfg, key
    # MTP weights go to layer num_hidden_layers, as in DeepSeek's release, and come back
    reloaded, _ = r1kit.load(tmp_path / "m")
    assert len(reloaded.mtp) == 1
    for (k, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_sharded_save_round_trip(tmp_path):
    model = Transformer(ModelConfig.preset("tiny-dense"))
    r1kit.save(model, None, tmp_path / "m", max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    back, _ = r1kit.load(tmp_path / "m")
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), back(ids))


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense", "tiny-dense-6-per-kv-head"])
def test_incremental_decoding_equals_full_forward(preset):
    torch.manual_seed(0)
    if preset == "tiny-dense-6-per-kv-head":  # R1-Distill-Qwen-1.5B's grouping: decode folds the query heads
        cfg = ModelConfig.preset("tiny-dense", num_attention_heads=12, num_key_value_heads=2)
    else:
        cfg = ModelConfig.preset(preset)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 512, (3, 16))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 32)
        pos = torch.arange(16).expand(3, 16)
        pieces = [model(ids[:, :5], positions=pos[:, :5], cache=cache)]
        for t in range(5, 16):
            pieces.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache))
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-4


def test_rows_at_different_positions_are_independent():
    """Continuous batching: a row restarted at slot 0 while another is mid-sequence."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    a, b = torch.randint(0, 512, (1, 10)), torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        ref_a, ref_b = model(a)[0, -1], model(b)[0, -1]
        cache = model.new_cache(2, 16)
        model(a[:, :9], positions=torch.arange(9).unsqueeze(0), cache=_row(cache, 0))
        # row 1 holds stale data from an earlier sequence: it must be ignored
        model(torch.randint(0, 512, (1, 12)), positions=torch.arange(12).unsqueeze(0), cache=_row(cache, 1))
        model(b[:, :5], positions=torch.arange(5).unsqueeze(0), cache=_row(cache, 1))
        step = torch.stack([a[0, 9], b[0, 5]]).unsqueeze(1)
        out = model(step, positions=torch.tensor([[9], [5]]), cache=cache)
    assert (out[0, -1] - ref_a).abs().max() < 1e-4
    assert (out[1, -1] - ref_b).abs().max() < 1e-4


def _row(cache, i):
    from r1kit.model.transformer import Cache
    layers = [tuple(t[i:i + 1] for t in layer) if isinstance(layer, tuple) else layer[i:i + 1]
              for layer in cache.layers]
    return Cache(layers, cache.max_seq_len)


def test_absorbed_mla_equals_naive_and_caches_only_latent():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg).eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 7, cfg.hidden_size)
    pos = torch.arange(7).expand(2, 7)
    cos, sin = model.rotary.cos_sin(pos, x.dtype)
    with torch.no_grad():
        naive = attn(x, model.rotary, cos, sin)
        cache = attn.new_cache(2, 8, torch.float32, "cpu")
        slots = torch.arange(8)
        mask = (slots.view(1, 1, -1) <= pos.unsqueeze(-1)).unsqueeze(1)[..., :7]
        absorbed = attn(x, model.rotary, cos, sin, mask, cache, cache_slots(pos, 8), 7)
    assert (naive - absorbed).abs().max().item() < 1e-5
    assert cache.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim  # only c_kv and the rope key


@pytest.mark.parametrize("T", [1, 5])  # a decode step, a prefill
def test_absorbed_mla_attends_with_a_fused_kernel_not_the_math_fallback(T):
    """Absorbed MLA attends with the whole latent as key and value (the value's rope columns are
    dropped afterwards): one head size, so SDPA's CPU kernel is the fused one. With the c_kv part
    alone as value it fell back to the math kernel, which made a tiny V3 model's decoding ~1.7x slower."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 16)
        pos = torch.arange(9).expand(3, 9)
        model(ids[:, :9 - T], positions=pos[:, :9 - T], cache=cache)
        with torch.profiler.profile() as prof:
            step = model(ids[:, 9 - T:], positions=pos[:, 9 - T:], cache=cache)
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in names, sorted(n for n in names if "attention" in n)
    assert (step - full[:, 9 - T:]).abs().max().item() < 1e-4


def _dense_moe_reference(moe: MoE, x):
    """Every expert on every token, weighted by a dense gate matrix: the definition, slowly."""
    flat = x.reshape(-1, x.shape[-1])
    ids, gates, _ = moe.gate(flat)
    dense_gates = torch.zeros(flat.shape[0], moe.experts.gate_up_proj.shape[0]).scatter(1, ids, gates)
    out = torch.zeros_like(flat)
    for e in range(dense_gates.shape[1]):
        g, u = torch.nn.functional.linear(flat, moe.experts.gate_up_proj[e]).chunk(2, -1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, moe.experts.down_proj[e])
        out += dense_gates[:, e:e + 1] * y
    return (out + moe.shared_experts(flat)).view_as(x)


@pytest.mark.parametrize("experts_in_c", [True, False])  # _ExpertsFFN (float32 on a CPU), torch's kernels
@pytest.mark.parametrize("moe_intermediate_size", [96, 6])  # grouped GEMM kernel, per-expert loop
def test_grouped_moe_dispatch_equals_dense_reference(moe_intermediate_size, experts_in_c, monkeypatch):
    import r1kit.model.moe as moe_mod

    if not experts_in_c:
        monkeypatch.setattr(moe_mod, "_experts_in_c", lambda *a: False)
    elif not moe_mod._experts_in_c(torch.zeros(1, 8), torch.zeros(2, 4, 8), torch.zeros(2, 8, 2)):
        pytest.skip("no C kernels, or no BLAS in torch to give them")
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", routed_scaling_factor=2.5, moe_intermediate_size=moe_intermediate_size)
    moe = Transformer(cfg).model.layers[1].mlp.eval()
    moe.gate.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(3, 11, cfg.hidden_size, requires_grad=True)
    ref = _dense_moe_reference(moe, x)
    out = moe(x)  # with grad: the sorted, grouped dispatch (not the decode gather)
    assert (out.detach() - ref.detach()).abs().max().item() < 1e-5
    # and the same gradients: through the dispatch and combine gathers, the experts and the gates
    wrt = (x, moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight)
    dy = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, wrt, dy), torch.autograd.grad(ref, wrt, dy)):
        assert (a - b).abs().max().item() < 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("threads", [1, 2])
def test_experts_ffn_in_c_equals_each_experts_swiglu(threads):
    """moe._ExpertsFFN (r1_experts_forward / _backward: a thread per expert, MKL's sgemm inside): every
    expert's SwiGLU on its rows and every gradient, odd sizes, an expert without rows (zero gradients)."""
    import r1kit.model.moe as moe_mod

    torch.manual_seed(0)
    E, H, I = 5, 20, 7
    counts = torch.tensor([6, 0, 13, 1, 9])
    xs = torch.randn(int(counts.sum()), H, requires_grad=True)
    gate_up = torch.randn(E, 2 * I, H, requires_grad=True)
    down = torch.randn(E, H, I, requires_grad=True)
    if not moe_mod._experts_in_c(xs, gate_up, down):
        pytest.skip("no C kernels, or no BLAS in torch to give them")
    rows = [0, *counts.cumsum(0).tolist()]
    ref = torch.cat([torch.nn.functional.linear(
        torch.nn.functional.silu(g) * u, down[e]) for e in range(E)
        for g, u in [torch.nn.functional.linear(xs[rows[e]:rows[e + 1]], gate_up[e]).chunk(2, -1)]])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ys = moe_mod._ExpertsFFN.apply(xs, gate_up, down, counts)
        dy = torch.randn_like(ys)
        grads = torch.autograd.grad(ys, (xs, gate_up, down), dy)
    finally:
        torch.set_num_threads(before)
    assert (ys - ref).abs().max().item() < 1e-4
    for a, b in zip(grads, torch.autograd.grad(ref, (xs, gate_up, down), dy)):
        assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())
    assert not grads[1][1].any() and not grads[2][1].any()  # the expert without rows


def test_experts_ffn_op_compiles_in_one_graph_with_the_eager_gradients():
    """Under torch.compile the experts' C calls run as the op r1kit::experts_ffn (and its backward op)."""
    import r1kit.model.moe as moe_mod

    torch.manual_seed(0)
    E, H, I = 4, 16, 6
    counts = torch.tensor([5, 0, 9, 3])
    xs = torch.randn(int(counts.sum()), H, requires_grad=True)
    gate_up, down = torch.randn(E, 2 * I, H, requires_grad=True), torch.randn(E, H, I, requires_grad=True)
    if not moe_mod._experts_in_c(xs, gate_up, down):
        pytest.skip("no C kernels, or no BLAS in torch to give them")
    eager = moe_mod._ExpertsFFN.apply(xs, gate_up, down, counts)
    compiled = torch.compile(lambda *a: moe_mod.experts_ffn(*a)[0], fullgraph=True)(xs, gate_up, down, counts)
    assert torch.equal(eager, compiled)
    dy = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(eager, (xs, gate_up, down), dy),
                    torch.autograd.grad(compiled, (xs, gate_up, down), dy)):
        assert torch.equal(a, b)


def test_moe_under_bf16_autocast_runs_grouped_and_trains_float32_weights(monkeypatch):
    """SFT's mixed precision (bf16 autocast, float32 master weights): grouped_mm is not on autocast's
    list, so the experts cast as autocast would and still take the grouped kernel, not the loop."""
    import r1kit.model.moe as moe_mod

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", routed_scaling_factor=2.5)
    moe = Transformer(cfg).model.layers[1].mlp.train()
    x = torch.randn(3, 11, cfg.hidden_size, requires_grad=True)
    ref = _dense_moe_reference(moe, x)
    monkeypatch.setattr(moe_mod.Experts, "_loop", lambda *a: pytest.fail("autocast fell back to the loop"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    scale = ref.abs().max().item()
    assert (out.float() - ref).abs().max().item() < 0.03 * scale
    wrt = (moe.experts.gate_up_proj, moe.experts.down_proj)
    dy = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out.float(), wrt, dy), torch.autograd.grad(ref, wrt, dy)):
        assert a.dtype == torch.float32
        assert (a - b).abs().max().item() < 0.03 * b.abs().max().item()


@pytest.mark.parametrize("n_tokens", [1, 3, 16])
def test_decode_moe_gathers_expert_weights_and_equals_dense_reference(n_tokens, monkeypatch):
    """A few tokens without grad (decoding): each (token, expert) pair runs with its expert's
    weights gathered, no sort and no grouped GEMM (so a compiled step stays one graph)."""
    import r1kit.model.moe as moe_mod

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", routed_scaling_factor=2.5)
    moe = Transformer(cfg).model.layers[1].mlp.eval()
    moe.gate.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(n_tokens, 1, cfg.hidden_size)
    with torch.no_grad():
        ref = _dense_moe_reference(moe, x)

    def no_grouped(*a, **k):
        raise AssertionError("decode-sized MoE took the grouped path")

    monkeypatch.setattr(moe_mod, "_grouped_swiglu", no_grouped)
    with torch.no_grad():
        assert (moe(x) - ref).abs().max().item() < 1e-5


def test_grouped_experts_op_has_the_eager_gradient_and_compiles_in_one_graph():
    """Under torch.compile each grouped GEMM runs as a custom op (r1kit::grouped_linear) with its
    own backward, so a DeepSeek model's forward and backward trace as a single graph."""
    from r1kit.model.moe import _grouped_linear, grouped_linear

    torch.manual_seed(0)
    E, P, H, O = 4, 40, 16, 8
    x, w = torch.randn(P, H, requires_grad=True), torch.randn(E, O, H, requires_grad=True)
    offsets = torch.tensor([10, 0, 20, 10]).cumsum(0).to(torch.int32)  # an expert with no rows
    y = _grouped_linear(x, w, offsets)
    dense = torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate(zip([0, *offsets[:-1].tolist()], offsets.tolist()))])
    assert (y - dense).abs().max().item() < 1e-5
    dy = torch.randn_like(y)
    ref = torch.autograd.grad(y, (x, w), dy)
    y_op = grouped_linear(x, w, offsets)
    got = torch.autograd.grad(y_op, (x, w), dy)
    assert torch.equal(y, y_op)
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() < 1e-5 * b.abs().max().item()
    assert got[1][1].abs().max().item() == 0  # the expert with no rows gets no gradient
    torch.library.opcheck(grouped_linear, (x, w, offsets))

    model = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=0)).train()
    explained = torch._dynamo.explain(lambda ids: model.loss(ids)["loss"])(torch.randint(0, 512, (2, 16)))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    # and the traced forward and backward (aot_eager: the graphs inductor would get) give eager's gradients
    ids = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    eager = torch.autograd.grad(model.loss(ids)["loss"], params)
    traced = torch.autograd.grad(torch.compile(lambda i: model.loss(i)["loss"], backend="aot_eager")(ids), params)
    for a, b in zip(traced, eager):
        assert (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1e-3)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (12, 2), (4, 2)])
def test_decode_attention_folds_query_heads_per_kv_head_exactly(heads, kv_heads, monkeypatch):
    """One-token decode with >= FOLD_MIN_GROUP query heads per KV head runs each KV head's query heads
    as query rows of one head; the result equals SDPA's own grouped-query attention."""
    import torch.nn.functional as F

    import r1kit.model.attention as attention

    torch.manual_seed(0)
    B, S, D = 3, 40, 16
    q = torch.randn(B, 1, heads, D).transpose(1, 2)  # (B, H, 1, D), strided as the model hands it over
    k, v = (torch.randn(B, S, kv_heads, D).transpose(1, 2) for _ in range(2))
    mask = torch.zeros(B, 1, 1, S)
    mask[0, ..., 25:] = float("-inf")  # rows at different lengths
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    out = attention.attend(q, k, v, mask, 0.3, gqa=True)
    assert (out - ref).abs().max().item() < 1e-5
    folded = heads // kv_heads >= attention.FOLD_MIN_GROUP
    assert calls[-1] == ((B, kv_heads, heads // kv_heads, D) if folded else (B, heads, 1, D))


def test_compiled_mla_training_skips_the_value_padding_on_short_sequences(monkeypatch):
    """On a CPU, MLA pads V to the query's head size for the flash kernel; compiled, up to
    MATH_PATH_MAX_LEN tokens it leaves V unpadded (the faster math path) and gives the same values."""
    import r1kit.model.attention as attention

    torch.manual_seed(0)
    layer = Transformer(ModelConfig.preset("tiny")).model.layers[0].self_attn  # v 32 < q 48 dims: padding applies
    assert layer.v_dim < layer.nope_dim + layer.rope_dim
    x = torch.randn(2, 12, layer.o_proj.out_features)

    def ops_traced(max_len):
        monkeypatch.setattr(attention, "MATH_PATH_MAX_LEN", max_len)
        torch._dynamo.reset()
        seen = []

        def backend(gm, _):
            seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward
        out = torch.compile(lambda t: layer._naive(*_mla_inputs(layer, t), None), backend=backend)(x)
        return out, seen

    eager = layer._naive(*_mla_inputs(layer, x), None)
    short, ops = ops_traced(256)
    assert not any("pad" in op for op in ops), ops
    padded, ops = ops_traced(8)  # 12 tokens > 8: the flash kernel on padded V again
    assert any("pad" in op for op in ops), ops
    for out in (short, padded):
        assert (out - eager).abs().max().item() < 1e-5


def _mla_inputs(layer, x):
    """What MLAttention.forward hands `_naive`: q_nope, q_rope, c_kv, k_rope (no rotation: not needed here)."""
    B, T, _ = x.shape
    q = layer.q_b_proj(layer.q_a_layernorm(layer.q_a_proj(x))) if layer.q_lora_rank else layer.q_proj(x)
    q_nope, q_rope = q.view(B, T, layer.n_heads, -1).split([layer.nope_dim, layer.rope_dim], dim=-1)
    c_kv, k_rope = layer.kv_a_proj_with_mqa(x).split([layer.kv_lora_rank, layer.rope_dim], dim=-1)
    return q_nope, q_rope, layer.kv_a_layernorm(c_kv), k_rope.unsqueeze(2)


def test_group_limited_routing_keeps_chosen_experts_in_topk_groups():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    gate = Transformer(cfg).model.layers[1].mlp.gate
    ids, gates, _ = gate(torch.randn(50, cfg.hidden_size))
    groups = ids // 4
    assert all(len(set(row.tolist())) <= 2 for row in groups)
    assert torch.allclose(gates.sum(-1), torch.full((50,), cfg.routed_scaling_factor), atol=1e-5)


def test_balancing_bias_moves_load_toward_uniform():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", n_group=1, topk_group=1)
    moe = Transformer(cfg).model.layers[1].mlp.train()
    with torch.no_grad():  # skew the router: expert 0 and 1 win almost everything
        moe.gate.weight[:2] += 0.5 * torch.randn(cfg.hidden_size).sign()
    x = torch.randn(4, 64, cfg.hidden_size)
    x = x + 0.5 * moe.gate.weight[:2].sum(0)

    def imbalance():
        moe.expert_load.zero_()
        with torch.no_grad():
            moe(x)
        load = moe.expert_load.clone()
        moe.expert_load.zero_()
        return (load.max() / load.mean()).item()

    before = imbalance()
    for _ in range(60):
        with torch.no_grad():
            moe(x)
        moe.update_bias(0.05)
    after = imbalance()
    assert before > 2.0
    assert after < before / 1.5
    # the bias only chooses experts: gates still come from the unbiased affinities
    ids, gates, scores = moe.gate(x.reshape(-1, cfg.hidden_size))
    expect = scores.gather(1, ids)
    assert torch.allclose(gates, expect / expect.sum(-1, keepdim=True) * cfg.routed_scaling_factor, atol=1e-6)


def test_sequence_balance_loss_and_mtp_loss_train():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", aux_loss_alpha=0.01, vocab_size=32, hidden_size=64, num_hidden_layers=2)
    model = Transformer(cfg).train()
    data = torch.arange(32).repeat(2, 2)[:, :40]  # a learnable pattern: counting mod 32
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(30):
        out = model.loss(data)
        assert out["aux_loss"].item() > 0 and out["mtp_loss"].item() > 0
        if first is None:
            first = {k: v.item() for k, v in out.items()}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_router_bias()
    assert model.mtp[0].eh_proj.weight.grad is not None
    assert out["mtp_loss"].item() < first["mtp_loss"] * 0.5
    assert out["lm_loss"].item() < first["lm_loss"] * 0.5


def test_presets_instantiate_on_meta_with_real_sizes():
    sizes = {}
    for name in ("deepseek-v3", "deepseek-v2-lite", "r1-distill-qwen-1.5b", "r1-distill-qwen-7b",
                 "r1-distill-llama-8b"):
        with torch.device("meta"):
            sizes[name] = Transformer(ModelConfig.preset(name)).num_parameters() / 1e9
    # DeepSeek-V3: 671B main model + the MTP module (its embedding and head are shared here)
    assert 680 < sizes["deepseek-v3"] < 686
    assert 15.5 < sizes["deepseek-v2-lite"] < 16.0
    assert 1.7 < sizes["r1-distill-qwen-1.5b"] < 1.8
    assert 7.5 < sizes["r1-distill-qwen-7b"] < 7.7
    assert 8.0 < sizes["r1-distill-llama-8b"] < 8.1


def test_config_round_trips_through_hf_keys():
    for name in ("tiny", "deepseek-v3", "r1-distill-llama-8b", "r1-distill-qwen-7b"):
        cfg = ModelConfig.preset(name)
        again = ModelConfig.from_hf(cfg.to_hf())
        assert again.to_hf() == cfg.to_hf()


# ---------------------------------------------------------------------------- bad input


def test_bad_configs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="'hidden_size' is missing"):
        ModelConfig.from_hf({"model_type": "qwen2", "vocab_size": 10, "num_hidden_layers": 1,
                             "num_attention_heads": 2})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.preset("tiny", num_experts_per_tok=9)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("gpt-5")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        r1kit.load(tmp_path / "nothing")


def test_bad_checkpoints_fail_loudly_naming_tensor_and_file(tmp_path):
    from safetensors.torch import load_file, save_file

    model = Transformer(ModelConfig.preset("tiny-dense"))
    r1kit.save(model, None, tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    state = load_file(weights)

    def variant(name, mutate):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
        s = dict(state)
        mutate(s)
        save_file(s, str(folder / "model.safetensors"))
        return folder

    missing = variant("missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        r1kit.load(missing)
    shaped = variant("shape", lambda s: s.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(7,\)"):
        r1kit.load(shaped)
    extra = variant("extra", lambda s: s.__setitem__("model.layers.9.foo.weight", torch.ones(2)))
    with pytest.raises(ValueError, match="unexpected tensors"):
        r1kit.load(extra)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        r1kit.load(corrupt)


def test_failed_save_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    model = Transformer(ModelConfig.preset("tiny-dense"))
    r1kit.save(model, None, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    class Broken:
        def save(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        r1kit.save(Transformer(ModelConfig.preset("tiny-dense")), Broken(), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial folder left behind


def test_info_counts_deepseek_v3_as_published():
    from r1kit.model.info import describe

    info = describe(ModelConfig.preset("deepseek-v3"))
    assert 670e9 < info["parameters_without_mtp"] < 672e9  # "671B total"
    assert 36.5e9 < info["active_parameters_per_token"] < 38e9  # "37B activated"
    assert info["kv_cache_numel_per_token_per_layer"] == 512 + 64  # latent + shared rope key


def test_logits_at_selected_positions_equal_full_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    ids = torch.randint(0, 512, (2, 12))
    where = torch.tensor([[3, 11], [0, 7]])
    with torch.no_grad():
        full = model(ids)
        some = model(ids, logits_at=where)
    assert some.shape == (2, 2, 512)
    assert torch.allclose(some, full.gather(1, where.unsqueeze(-1).expand(-1, -1, 512)), atol=1e-6)
