"""Expert parallelism on gloo against the same training in one process.

Each layout trains the MoE model of `common.moe_config` for 3 AdamW steps on the same global batches and must
reproduce the one-process run: the LM loss, the auxiliary and z-losses, the tokens per expert (and dropped slots),
every gradient of the first step (each canonical tensor assembled from the ranks' pieces, replicas agreeing),
the gradient norm and every parameter after the last step (expert biases included).
"""

from __future__ import annotations

import pytest
import torch

from megalith.core.fp8 import Fp8Config
from tests.core.moe.common import OPT, assemble, moe_config, reference_training, train_worker
from tests.harness import run_distributed

STEPS, MICROBATCHES = 3, 2

LAYOUTS = {
    "ep2": (2, {"ep": 2}, {}),
    "ep4": (4, {"ep": 4}, {}),
    "ep2-allgather": (2, {"ep": 2, "moe_dispatcher": "allgather"}, {}),
    "ep2xtp2": (4, {"ep": 2, "tp": 2}, {}),
    "ep2xtp2-sp": (4, {"ep": 2, "tp": 2, "sequence_parallel": True}, {}),
    "ep2xtp2-sp-whole-experts": (4, {"ep": 2, "tp": 2, "sequence_parallel": True, "expert_tp": 1}, {}),
    "ep2xpp2-interleaved": (4, {"ep": 2, "pp": 2, "virtual_stages": 2}, {"clip": 0.5}),
    "ep2xpp2xdp2-zero": (8, {"ep": 2, "pp": 2}, {"zero": True, "clip": 0.5}),
    "cp2": (2, {"cp": 2}, {}),
    "ep2xcp2-allgather-attention": (4, {"ep": 2, "cp": 2, "cp_comm": "allgather"}, {}),
    "cp2xtp2-sp": (4, {"cp": 2, "tp": 2, "sequence_parallel": True}, {}),
}


def _compare(cfg, world, layout, options, *, param_atol=3e-5):
    pp_tp = layout.get("pp", 1) * layout.get("tp", 1) * layout.get("cp", 1)  # the ranks that share data
    ref = reference_training(
        cfg, MICROBATCHES, world // pp_tp, STEPS, clip=options.get("clip", 0.0), fp8=options.get("fp8")
    )
    results = run_distributed(train_worker, world, cfg, layout, MICROBATCHES, STEPS, timeout=600, **options)
    for out in results:
        assert out["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert out["norms"] == pytest.approx(ref["norms"], rel=1e-4)
        for got, want in zip(out["reports"], ref["reports"], strict=True):
            assert got.aux_loss == pytest.approx(want.aux_loss, rel=1e-5)
            assert got.z_loss == pytest.approx(want.z_loss, rel=1e-5)
            assert got.tokens_per_expert == want.tokens_per_expert
            assert got.dropped_fraction == want.dropped_fraction
    if not options.get("zero"):  # under ZeRO-1 a rank's main_grad is final only in the range it owns
        grads = assemble([out["grads"] for out in results], atol=1e-6)
        assert set(grads) == set(ref["grads"])
        for name, want in ref["grads"].items():
            torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=2e-6, msg=name)
    params = assemble([out["params"] for out in results], atol=1e-6)
    assert set(params) == set(ref["params"])
    for name, want in ref["params"].items():
        torch.testing.assert_close(params[name], want, rtol=1e-4, atol=param_atol, msg=name)
    return ref, results


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_parallel_training_matches_one_process(name):
    world, layout, options = LAYOUTS[name]
    _compare(moe_config(), world, layout, options)


FP8_LAYOUTS = {
    "rowwise-ep2": (2, {"ep": 2}, "rowwise"),
    "rowwise-ep2xtp2-sp": (4, {"ep": 2, "tp": 2, "sequence_parallel": True}, "rowwise"),
    "tensorwise-ep2xtp2": (4, {"ep": 2, "tp": 2}, "tensorwise"),
    "tensorwise-ep2xpp2": (4, {"ep": 2, "pp": 2}, "tensorwise"),
}


@pytest.mark.parametrize("name", list(FP8_LAYOUTS))
def test_fp8_experts_match_one_process(name):
    """The routed experts' fp8 projections (each expert its own scales; amaxes over a dimension split by expert
    tp reduced over tp) give the one-process fp8 training. fp8 scales span tokens (an expert's rows, or for the
    weight gradient the tokens of each column), so they depend on which tokens meet in one matmul: every data
    rank reads the same micro-batches here, and an expert then sees each token twice, which changes no amax."""
    world, layout, recipe = FP8_LAYOUTS[name]
    fp8, cfg = Fp8Config(recipe=recipe), moe_config()
    ref = reference_training(cfg, MICROBATCHES, 1, STEPS, fp8=fp8)
    results = run_distributed(train_worker, world, cfg, layout, MICROBATCHES, STEPS, fp8=fp8, same_data=True,
                              timeout=600)  # fmt: skip
    for out in results:
        assert out["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert [r.aux_loss for r in out["reports"]] == pytest.approx([r.aux_loss for r in ref["reports"]], rel=1e-5)
    grads = assemble([out["grads"] for out in results], atol=1e-6)
    for name_, want in ref["grads"].items():
        torch.testing.assert_close(grads[name_], want, rtol=1e-4, atol=2e-6, msg=name_)
    params = assemble([out["params"] for out in results], atol=1e-6)
    for name_, want in ref["params"].items():
        torch.testing.assert_close(params[name_], want, rtol=1e-4, atol=3e-5, msg=name_)
    plain = reference_training(cfg, MICROBATCHES, 1, 1, grads_only=True)
    assert abs(ref["losses"][0] - plain["losses"][0]) > 1e-4, "fp8 must change the numbers"


@pytest.mark.parametrize("layout", [{"ep": 2}, {"ep": 2, "cp": 2}], ids=["ep2xdp2", "ep2xcp2"])
def test_sigmoid_router_with_expert_bias_and_sequence_aux_loss(layout):
    cfg = moe_config(moe_score_function="sigmoid", moe_expert_bias=True, moe_expert_bias_rate=0.01,
                     moe_aux_loss_type="sequence")  # fmt: skip
    # Under cp each gradient is summed over the cp ranks in another order. qk-norm leaves some q/k weight
    # gradients at rounding-noise size, and Adam (eps 1e-8) moves such an element by up to lr (1e-2) whatever
    # the noise's size: measured 1.5e-4 at ep2 x cp2, every gradient of the first step equal to 2e-6.
    ref, _ = _compare(cfg, 4, layout, {}, param_atol=3e-4 if "cp" in layout else 3e-5)
    bias = ref["params"]["layers.0.mlp.router.expert_bias"]
    assert bias.abs().max() > 0.005, "the expert bias must have moved"


@pytest.mark.parametrize(
    ("world", "layout", "policy"),
    [(4, {"ep": 2, "tp": 2, "sequence_parallel": True}, "probs"), (2, {"ep": 2, "moe_dispatcher": "allgather"},
                                                                     "position")],
)  # fmt: skip
def test_capacity_dropping_matches_one_process(world, layout, policy):
    cfg = moe_config(moe_capacity_factor=1.0, moe_token_drop_policy=policy)
    ref, _ = _compare(cfg, world, layout, {})
    assert all(0.1 < r.dropped_fraction < 0.5 for r in ref["reports"]), "the test must drop some slots"


def test_bf16_expert_parallel_tracks_fp32():
    cfg = moe_config()
    ref = reference_training(cfg, MICROBATCHES, 2, STEPS)
    results = run_distributed(train_worker, 2, cfg, {"ep": 2}, MICROBATCHES, STEPS, precision="bf16", timeout=600)
    for out in results:
        assert out["losses"] == pytest.approx(ref["losses"], rel=2e-2)
        assert out["reports"][0].aux_loss == pytest.approx(ref["reports"][0].aux_loss, rel=5e-2)
    params = assemble([out["params"] for out in results])
    # Adam moves an element by about lr per step whatever its gradient's size, so an element whose gradient is
    # near zero can step the other way under bf16 rounding: two runs may part by up to 2 * lr per step.
    atol = 2 * OPT["lr"] * STEPS
    for name, want in ref["params"].items():
        torch.testing.assert_close(params[name], want, rtol=5e-2, atol=atol, msg=name)


def _refusal(rank, world, what: str):
    """The ValueError message of building `what` on this rank (None when nothing refuses it)."""
    from megalith.core import ParallelConfig, ParallelDims, build_model_chunks
    from megalith.core.distributed import apply_fsdp2

    try:
        if what == "fsdp2":
            (model,) = build_model_chunks(moe_config(), ParallelDims(dp=world))
            apply_fsdp2(model, ParallelDims(dp=world))
        else:  # a capacity factor under cp
            parallel = ParallelConfig(cp=2)
            build_model_chunks(moe_config(moe_capacity_factor=1.0), ParallelDims.from_config(parallel, world),
                               parallel=parallel)  # fmt: skip
    except ValueError as exc:
        return str(exc)
    return None


def test_fsdp2_refuses_moe_models():
    for message in run_distributed(_refusal, 2, "fsdp2", timeout=300):
        assert message is not None and "does not shard mixture-of-experts models" in message


def test_a_capacity_factor_is_refused_under_context_parallelism():
    for message in run_distributed(_refusal, 2, "cp-capacity", timeout=300):
        assert message is not None and "moe_capacity_factor (1.0) with context parallelism (cp=2)" in message
