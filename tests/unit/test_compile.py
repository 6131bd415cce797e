"""LoraTrainConfig.compile: torch.compile of the denoiser's blocks for training, on the tiny pure-torch model."""
import pytest
import torch

from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, TrainingInputError, prepare_data
from tiny_torch import TinyDiffusion, images


def _run(steps=6, inplace=False, **kw):
    model = TinyDiffusion()
    model.inplace_blocks = inplace
    data = prepare_data(model, images(2), "a photo of sks person")
    trainer = LoraTrainer(model, data, LoraTrainConfig(steps=steps, learning_rate=3e-3, rank=4, **kw))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    bundle = trainer.run()
    return model, trainer, bundle, torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs


def _close(a, b):
    """Same LoRA within what float reordering leaves after a few AdamW steps (Adam's normalised step turns tiny
    gradient differences of entries near zero into visible ones, so the whole matrix is compared, not each entry)."""
    for k in a.weights:
        for x, y in ((a.weights[k].up, b.weights[k].up), (a.weights[k].down, b.weights[k].down)):
            assert (x - y).norm() <= 1e-2 * x.norm() + 1e-6, (k, (x - y).norm().item(), x.norm().item())


@pytest.mark.parametrize("ckpt,inplace", [(False, False), (True, False), (False, True)],
                         ids=["plain", "checkpointing", "inplace_blocks"])
def test_compiled_training_matches_eager_and_trains(ckpt, inplace):
    """inplace_blocks: the path of Flux and SD3 (blocks that add to their residual stream in place; ComfyDiffusion
    says so): norms read copies and saved tensors are copied with their strides."""
    _, eager, a, _ = _run(gradient_checkpointing=ckpt, inplace=inplace)
    torch._dynamo.reset()  # nothing compiled by an earlier test to reuse, so that the graphs can be counted
    model, compiled, b, graphs = _run(gradient_checkpointing=ckpt, inplace=inplace, compile=True)
    assert graphs >= 2  # dynamo compiled both blocks' forward (and autograd their backward): not a silent eager run
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-5)
    _close(a, b)
    assert all(torch.count_nonzero(w.up) for w in b.weights.values())  # every LoRA layer trained
    # the session put everything back: the blocks' and norms' own forward, no hooks
    assert all("forward" not in vars(m) for m in model.denoiser.modules())
    assert all(not m._forward_hooks for m in model.denoiser.modules())


def test_compile_with_checkpointing_refused_on_models_whose_blocks_add_in_place():
    model = TinyDiffusion()
    model.inplace_blocks = True  # as ComfyDiffusion says of Flux and SD3
    trainer = LoraTrainer(model, prepare_data(model, images(1), "x"),
                          LoraTrainConfig(steps=1, rank=2, compile=True, gradient_checkpointing=True))
    with pytest.raises(TrainingInputError, match="compile and gradient_checkpointing cannot be combined on tiny"):
        trainer.run()
    assert all(not m._forward_hooks for m in model.denoiser.modules())
    assert all("forward" not in vars(m) for m in model.denoiser.modules())


def test_compile_must_be_a_bool():
    with pytest.raises(TrainingInputError, match="compile"):
        LoraTrainConfig(compile="yes").validate()
