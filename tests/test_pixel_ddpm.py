"""Notebook 02's pixel-space DDPM (minisd/shapes/pixel_ddpm.py) and the checkpoint it ships in data/ddpm_pixels/."""

import torch
import pytest

from minisd.shapes import pixel_ddpm


def test_shipped_checkpoint_loads_strictly_and_says_how_it_was_made():
    net, record = pixel_ddpm.load()
    assert sum(p.numel() for p in net.parameters()) == 284_259
    assert record["command"] == f"python -m minisd.shapes.pixel_ddpm --steps {record['steps']}"
    assert len(record["loss"]) == record["steps"] // record["loss_every"]
    with torch.no_grad():
        eps_hat = net(torch.randn(2, 3, 16, 16), torch.tensor([5, 995]))
    assert eps_hat.shape == (2, 3, 16, 16) and torch.isfinite(eps_hat).all()


def test_loss_falls_on_a_memorised_batch():
    torch.manual_seed(0)
    net = pixel_ddpm.PixelUNet(c=8)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    losses = pixel_ddpm.train(net, x, 60, batch=4, lr=3e-3, generator=torch.Generator().manual_seed(0))
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_same_generator_same_weights():
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(pixel_ddpm.PixelUNet(c=8))
        pixel_ddpm.train(nets[-1], torch.zeros(4, 3, 16, 16), 3, batch=2, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))


@pytest.mark.parametrize("kwargs", [{"steps": -1}, {"batch": 0}, {"lr": 0.0}])
def test_careless_values_are_refused(kwargs):
    args = {"steps": 1, "batch": 2, "lr": 1e-3} | kwargs
    with pytest.raises(ValueError, match="need steps >= 0"):
        pixel_ddpm.train(pixel_ddpm.PixelUNet(c=8), torch.zeros(4, 3, 16, 16), generator=torch.Generator(), **args)


def test_a_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no model.safetensors"):
        pixel_ddpm.load(tmp_path)
