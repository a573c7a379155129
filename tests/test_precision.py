"""bf16 products on a CPU (r1kit.model.precision): close to float32, gradients into float32
parameters, the bf16 copies follow every weight update, the output head and attention stay float32."""
import torch
import pytest

from r1kit.model import ModelConfig, Transformer, precision
from r1kit.model.fuse import prepare_for_decode


def _kernels_run() -> bool:
    from r1kit.model import cpu_kernels

    lib = cpu_kernels.library()
    return lib is not None and lib.amx


@pytest.fixture(autouse=True, params=["kernels", "torch"])
def backend(request, monkeypatch):
    """Every test runs on both ways to multiply in bf16: r1kit's C kernels (AMX CPUs) and torch's
    products. The tests' small products would stay float32 (precision.MIN_MACS): here they run in bf16."""
    if request.param == "kernels" and not _kernels_run():
        pytest.skip("r1kit's bf16 kernels need a CPU with AMX")
    monkeypatch.setattr(precision, "KERNELS", request.param == "kernels")
    monkeypatch.setattr(precision, "MIN_MACS", 0)
    monkeypatch.setattr(precision, "KERNEL_MIN_MACS", 0)
    monkeypatch.setattr(precision, "KERNEL_MIN_WEIGHT", 0)
    return request.param


def _bf16(t):
    return t.to(torch.bfloat16).float()


def test_linear_matches_bf16_rounded_inputs_and_pads_rows(backend):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80)
    # torch's products pad rows to multiples of 64 (at least 64: below, float32); the kernels' tiles
    # are 16 x 32, so 7 * 64 + 3 rows and 80 columns leave partial tiles at every edge
    for rows in (64, 65, 130, 7 * 64 + 3):
        x = torch.randn(rows, 96, requires_grad=True)
        with precision.bf16_matmuls():
            assert precision.active(x, lin.weight)
            y = precision.linear(x, lin.weight, lin.bias)
        # the product of bf16-rounded inputs, accumulated in float32: what AMX computes
        ref = _bf16(x.detach()) @ _bf16(lin.weight.detach()).t() + lin.bias.detach()
        assert y.dtype == torch.float32 and y.shape == (rows, 80)
        # torch's products round the output to bf16 on top of the reference; the kernels' do not
        tol = dict(rtol=1e-2, atol=1e-2) if backend == "torch" else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, ref, **tol)
        dy = torch.randn(rows, 80)
        y.backward(dy)
        gw = lin.weight.grad
        lin.weight.grad = lin.bias.grad = None
        gx = x.grad
        tol = dict(rtol=1e-2, atol=2e-2) if backend == "torch" else dict(rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gx, _bf16(dy) @ _bf16(lin.weight.detach()), **tol)
        torch.testing.assert_close(gw, _bf16(dy).t() @ _bf16(x.detach()), **(tol if backend == "kernels" else
                                                                            dict(rtol=1e-2, atol=0.3)))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_every_weight_layout_multiplies_alike(layout):
    """The kernels pack (out, in) weights, transposed storage (a fused q|k|v block, fuse.py) and any
    other strides (element by element); torch's products take them as they are."""
    torch.manual_seed(0)
    base = torch.randn(45, 140)
    w = {"contiguous": base[:, :70].contiguous(), "transposed": base[:, :70].t().contiguous().t(),
         "strided": base[:, ::2]}[layout].requires_grad_()
    x = torch.randn(2, 33, 70, requires_grad=True)
    with precision.bf16_matmuls():
        assert precision.active(x, w)
        y = precision.linear(x, w)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(y, _bf16(x.detach()) @ _bf16(w.detach()).t(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad, _bf16(torch.ones(2, 33, 45)) @ _bf16(w.detach()), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(w.grad, _bf16(x.detach()).reshape(-1, 70).sum(0).expand(45, 70), rtol=1e-2, atol=0.3)


def test_gradients_land_in_float32_and_follow_float32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 192, bias=False)
    x = torch.randn(4, 50, 128)
    with precision.bf16_matmuls():
        precision.linear(x, lin.weight).square().mean().backward()
    g_low = lin.weight.grad.clone()
    lin.weight.grad = None
    torch.nn.functional.linear(x, lin.weight).square().mean().backward()
    assert g_low.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(g_low.flatten(), lin.weight.grad.flatten(), dim=0)
    assert cos > 0.999, cos
    assert (g_low - lin.weight.grad).abs().max() < 0.02 * lin.weight.grad.abs().max()


def test_bf16_copy_is_rebuilt_after_every_weight_update(backend):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64, bias=False)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)  # fused AdamW does not bump _version
    x = torch.randn(64, 64)

    def check():  # the product follows the weight as it is now
        with torch.no_grad():
            torch.testing.assert_close(precision.linear(x, lin.weight), _bf16(x) @ _bf16(lin.weight).t(),
                                       rtol=1e-2, atol=1e-2)

    with precision.bf16_matmuls():
        if backend == "torch":
            first = precision.low(lin.weight)
            assert precision.low(lin.weight) is first  # kept while the weight stays
        else:
            precision.linear(x, lin.weight)
            first = precision._packs(lin.weight)
            assert precision._packs(lin.weight) is first
        precision.linear(x, lin.weight).sum().backward()
        opt.step()
        check()
        second = precision.low(lin.weight) if backend == "torch" else precision._packs(lin.weight)
        assert second is not first
        if backend == "torch":
            torch.testing.assert_close(second.float(), _bf16(lin.weight.detach()))
        with torch.no_grad():
            lin.weight.mul_(2)  # an in-place write
        check()


def test_off_outside_the_context_and_for_few_rows_and_other_dtypes(backend):
    w = torch.randn(32, 32)
    least = precision.KERNEL_ROWS if backend == "kernels" else precision.ROWS
    assert not precision.active(torch.randn(least, 32), w)
    with precision.bf16_matmuls():
        assert precision.active(torch.randn(least, 32), w)
        assert not precision.active(torch.randn(least - 1, 32), w)  # too few rows to pay: float32
        assert not precision.active(torch.randn(least, 32, dtype=torch.float64), w.double())
        per_thread = torch.get_num_threads() if backend == "kernels" else 1
        setattr(precision, "KERNEL_MIN_MACS" if backend == "kernels" else "MIN_MACS", least * 32 * 32 // per_thread + 1)
        assert not precision.active(torch.randn(least, 32), w)  # too small a product to pay
        assert precision.active(torch.randn(2 * least, 32), w)
        if backend == "kernels":
            precision.KERNEL_MIN_WEIGHT = 32 * 32 + 1
            assert not precision.active(torch.randn(2 * least, 32), w)  # too small a weight to pay
            precision.KERNEL_MIN_WEIGHT = 0
        with precision.bf16_matmuls(False):
            assert not precision.active(torch.randn(2 * least, 32), w)
        assert precision.active(torch.randn(2 * least, 32), w)


def test_wanted():
    assert precision.wanted(True, "cpu") and not precision.wanted(False, "cpu")
    assert precision.wanted("auto", "cpu") == precision.fast_bf16_cpu()
    assert precision.wanted("auto", "cpu", hidden_size=512) == precision.fast_bf16_cpu()
    assert not precision.wanted("auto", "cpu", hidden_size=128)  # too narrow to pay: float32
    assert precision.wanted(True, "cpu", hidden_size=128)
    assert not precision.wanted(True, "meta")
    with pytest.raises(ValueError, match="bf16 must be"):
        precision.wanted("yes", "cpu")


@pytest.mark.parametrize("fused", [False, True])
def test_model_forward_and_backward_close_to_float32(fused):
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Transformer(cfg)
    if fused:
        prepare_for_decode(model)  # q|k|v and gate|up as one product each (_FusedLinear)
    ids = torch.randint(0, 97, (3, 40))

    def run(low: bool):
        model.zero_grad(set_to_none=True)
        with precision.bf16_matmuls(low):
            out = model.loss(ids)["loss"]
        out.backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss32, g32 = run(False)
    loss16, g16 = run(True)
    assert abs(loss16 - loss32) < 2e-3 * loss32
    for name, g in g32.items():
        assert g16[name].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g16[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, (name, cos)


@pytest.mark.parametrize("tied", [False, True])
def test_output_head_stays_float32(tied):
    """The head's logits feed every log-probability: bf16 products there would round them. Also in
    generation, where the engine's packed copies run the head (cpu_kernels, bf16 mode on AMX)."""
    from r1kit.engine import Engine

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    model = Transformer(cfg)
    head = model.model.embed_tokens.weight if tied else model.lm_head.weight
    h = torch.randn(2, 40, 128)
    with precision.bf16_matmuls():
        got = model.output_head(h)
    torch.testing.assert_close(got, torch.nn.functional.linear(h, head), rtol=0, atol=0)
    Engine(model)  # packed copies (where the kernels build)
    h = torch.randn(8, 1, 128)  # a decode step's rows: the packed path
    with torch.inference_mode():
        ref = model.output_head(h)
        with precision.bf16_matmuls():
            got = model.output_head(h)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_a_copy_made_in_inference_mode_serves_a_later_backward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(64, 64)
    with precision.bf16_matmuls():
        with torch.inference_mode():
            precision.linear(x, lin.weight, lin.bias)  # an evaluation first: the copy is made here
        precision.linear(x.requires_grad_(), lin.weight, lin.bias).sum().backward()
    assert lin.weight.grad is not None


def test_moe_experts_multiply_in_bf16_on_the_kernels(backend):
    """Each expert's rows times its matrices (rows sorted by expert, one expert with none), forward and
    backward; on torch's products the experts stay float32 (oneDNN would build a kernel per split)."""
    torch.manual_seed(0)
    E, H, N = 4, 70, 45
    w = torch.randn(E, N, H, requires_grad=True)
    counts = torch.tensor([33, 0, 70, 40])
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    x = torch.randn(int(counts.sum()), H, requires_grad=True)
    with precision.bf16_matmuls():
        if backend == "torch":
            assert not precision.grouped_active(x, w)
            return
        assert precision.grouped_active(x, w)
        y = precision.grouped_linear(x, w, offsets)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_y, ref_dx, ref_dw = torch.empty_like(y), torch.empty_like(x), torch.zeros_like(w)
    for e in range(E):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        ref_y[rows] = _bf16(x[rows].detach()) @ _bf16(w[e].detach()).t()
        ref_dx[rows] = _bf16(dy[rows]) @ _bf16(w[e].detach())
        ref_dw[e] = _bf16(dy[rows]).t() @ _bf16(x[rows].detach())
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, ref_dx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad, ref_dw, rtol=1e-5, atol=1e-4)
    assert (w.grad[1] == 0).all()  # the expert no row chose


def test_moe_model_trains_close_to_float32_with_bf16_experts(backend, monkeypatch):
    from r1kit.model import moe

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")  # DeepSeek-V3 style: MLA, shared and routed experts
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 48))
    calls = []
    real = precision.grouped_linear
    monkeypatch.setattr(precision, "grouped_linear", lambda *a: calls.append(1) or real(*a))

    def run(low: bool):
        model.zero_grad(set_to_none=True)
        with precision.bf16_matmuls(low):
            out = model.loss(ids)["loss"]
        out.backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss32, g32 = run(False)
    loss16, g16 = run(True)
    assert bool(calls) == (backend == "kernels")  # the experts took the bf16 kernels (torch's way: float32)
    assert moe is not None and abs(loss16 - loss32) < 2e-3 * loss32
    for name, g in g32.items():
        if "experts.gate_up_proj" in name or "experts.down_proj" in name:
            cos = torch.nn.functional.cosine_similarity(g16[name].flatten(), g.flatten(), dim=0)
            assert cos > 0.99, (name, cos)


def test_decoding_and_training_share_the_forward_tiles(backend, monkeypatch):
    """GRPO generates, then trains on the same weights: in bf16 the engine's decode kernels multiply
    by the very W^T tiles that training's forward products use, packed once per weight change. An
    optimizer step packs both again; generation and the loss are unchanged by the sharing. (On torch's
    bf16 products training keeps no tiles: the engine packs its own copies.)"""
    from r1kit.engine import Engine, SamplingParams
    from r1kit.model import cpu_kernels

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Transformer(cfg)
    engine = Engine(model)
    o_proj = model.model.layers[1].self_attn.o_proj
    params = SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=0)

    def generate():
        with precision.bf16_matmuls():
            return [g.token_ids for g in engine.generate([[1, 2, 3]], params)]

    def train_forward():
        with precision.bf16_matmuls():
            return model.loss(torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1)))["loss"]

    first = generate()
    if backend != "kernels":
        assert not precision.shares_packs() and o_proj.weight not in precision._PACKS
        packed = o_proj.__dict__.get("packed_weight")  # (none where the kernels cannot build)
        assert packed is None or packed.buffer is not None
        return
    tiles = precision._PACKS[o_proj.weight].fwd  # made by the decode step
    assert tiles is not None and o_proj.packed_weight.buffer is None  # no second copy in the engine
    model.train()
    loss = train_forward()
    assert precision._PACKS[o_proj.weight].fwd is tiles  # training's forward multiplied by the same tiles
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * p.grad.sign())
    model.eval()
    second = generate()
    assert precision._PACKS[o_proj.weight].fwd is not tiles  # packed again after the update
    assert second != first
    monkeypatch.setattr(precision, "shares_packs", lambda: False)  # the engine's own copies, as before
    cpu_kernels.detach(model)  # (drops the decode plan too: it points at the packs)
    engine = Engine(model)
    assert generate() == second
    assert o_proj.packed_weight.buffer is not None
