"""A tiny exported checkpoint (built once per session) for the prediction and quantization tests."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from launch.tiny_models import build_tiny_model

    torch.set_num_threads(1)
    return build_tiny_model(str(tmp_path_factory.mktemp("predict") / "model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from modeling.checkpoints.checkpoint import load_for_inference

    return load_for_inference(tiny_checkpoint)
