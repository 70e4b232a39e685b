"""DistillationLoss: the value against a hand computation, the teacher untouched, layer mappings, a real training loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch_helpers import accuracy, same_state, split, state, trained_cnn

import inc_core as inc
import inc_torch
from inc_core.errors import ConfigError, UnsupportedModelError


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _hand_loss(s: np.ndarray, t: np.ndarray, labels: np.ndarray, temperature: float, hard_w: float, soft_w: float) -> float:
    ce = -_log_softmax(s)[np.arange(len(labels)), labels].mean()
    log_ps, log_pt = _log_softmax(s / temperature), _log_softmax(t / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean()
    return hard_w * ce + soft_w * temperature**2 * kl


class Fixed(nn.Module):
    """A 'teacher' that returns given logits, so the expected loss can be computed by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits * self.scale


def _train(student: nn.Module, kd: inc_torch.DistillationLoss, optimizer: torch.optim.Optimizer, *, epochs: int) -> list[float]:
    """A plain loop over the digits training split in batches of 50; the layer loss of each step (if any)."""
    x, y, _, _ = split()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    layer_losses = []
    for _ in range(epochs):
        for start in range(0, len(xt), 50):
            optimizer.zero_grad()
            xb = xt[start : start + 50]
            kd(student(xb), xb, yt[start : start + 50]).backward()
            optimizer.step()
            if "layer" in kd.last:
                layer_losses.append(kd.last["layer"])
    return layer_losses


def test_loss_equals_the_hand_computed_value() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=6)
    kd = inc_torch.DistillationLoss(Fixed(torch.from_numpy(t)), inc.DistillConfig(temperature=3.0, loss_weights=(0.3, 0.7)))
    got = kd(torch.from_numpy(s), torch.zeros(6, 1), torch.from_numpy(labels))
    assert float(got) == pytest.approx(_hand_loss(s, t, labels, 3.0, 0.3, 0.7), rel=1e-5)
    assert set(kd.last) == {"hard", "soft"}


def test_probabilities_from_a_final_softmax_distil_as_their_logits_would() -> None:
    # a teacher (or student) ending in nn.Softmax: tempering its probabilities as logits flattened the soft
    # targets toward uniform, and cross-entropy read them as logits
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = torch.from_numpy(rng.integers(0, 5, size=6))
    want = _hand_loss(s, t, labels.numpy(), 3.0, 0.3, 0.7)
    config = inc.DistillConfig(temperature=3.0, loss_weights=(0.3, 0.7))
    t_probs, s_probs = torch.softmax(torch.from_numpy(t), -1), torch.softmax(torch.from_numpy(s), -1)
    x = torch.zeros(6, 1)
    assert float(inc_torch.DistillationLoss(Fixed(t_probs), config)(s_probs, x, labels)) == pytest.approx(want, rel=1e-4)
    assert float(inc_torch.DistillationLoss(Fixed(t_probs), config)(torch.from_numpy(s), x, labels)) == pytest.approx(
        want, rel=1e-4
    )
    # a task loss of the user's own gets the student's output as it is
    seen = []
    kd = inc_torch.DistillationLoss(Fixed(t_probs), config, task_loss=lambda out, y: seen.append(out) or out.sum() * 0)
    kd(s_probs, x, labels)
    assert torch.equal(seen[0], s_probs)


def test_soft_cross_entropy_differs_from_kl_by_the_teacher_entropy() -> None:
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    teacher = Fixed(torch.from_numpy(t))
    kl = inc_torch.DistillationLoss(teacher, inc.DistillConfig(temperature=2.0, loss_weights=(0.0, 1.0)))
    ce = inc_torch.DistillationLoss(teacher, inc.DistillConfig(temperature=2.0, loss_weights=(0.0, 1.0), soft_loss="ce"))
    log_pt = _log_softmax(t / 2.0)
    entropy = -(np.exp(log_pt) * log_pt).sum(axis=1).mean()
    x = torch.zeros(4, 1)
    assert float(ce(torch.from_numpy(s), x)) - float(kl(torch.from_numpy(s), x)) == pytest.approx(4 * entropy, rel=1e-5)


def test_teacher_runs_without_gradients_and_keeps_its_mode() -> None:
    teacher = trained_cnn().train()
    before = state(teacher)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    kd = inc_torch.DistillationLoss(teacher, inc.DistillConfig())
    x, y, _, _ = split()
    xb = torch.from_numpy(x[:16])
    loss = kd(student(xb), xb, torch.from_numpy(y[:16]))
    loss.backward()
    assert teacher.training, "the teacher's training flag was not restored"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert same_state(state(teacher), before)  # BN running stats untouched: the teacher ran in eval mode
    assert "teacher" not in dict(kd.named_children())  # the teacher's weights stay out of kd.parameters()


def test_layer_mappings_add_the_mean_layer_loss() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    student = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    config = inc.DistillConfig(loss_weights=(0.0, 0.0, 1.0), layer_mappings=(("0", "0"), ("2", "2")))
    kd = inc_torch.DistillationLoss(teacher, config, student=student)
    x = torch.randn(5, 4)
    loss = kd(student(x), x)
    with torch.no_grad():
        expected = (
            nn.functional.mse_loss(student[0](x), teacher[0](x)) + nn.functional.mse_loss(student(x), teacher(x))
        ) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    kd.remove_hooks()
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_teacher_kept_in_16_bits_reads_the_batch_in_its_dtype(dtype: torch.dtype) -> None:
    """A teacher kept in bfloat16/float16 to save memory failed with torch's raw "mat1 and mat2 must have the same
    dtype" on the float32 batch; it reads the batch in its own dtype, the loss is the float32 teacher's within
    16-bit rounding, and a 16-bit teacher ending in a softmax is still read as probabilities."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    config = inc.DistillConfig(temperature=2.0, loss_weights=(0.5, 0.5, 1.0), layer_mappings=(("0", "0"),))
    x, labels = torch.randn(12, 8), torch.randint(0, 5, (12,))
    reference = inc_torch.DistillationLoss(teacher, config, student=student)
    want = reference(student(x), x, labels)
    reference.remove_hooks()
    half = inc_torch.DistillationLoss(copy.deepcopy(teacher).to(dtype), config, student=student)

    got = half(student(x), x, labels)
    got.backward()

    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=0.05)
    assert all(p.grad is not None for p in student.parameters())
    probabilities = copy.deepcopy(nn.Sequential(teacher, nn.Softmax(dim=-1))).to(dtype)
    soft_only = inc.DistillConfig(temperature=2.0, loss_weights=(0.0, 1.0))
    from_probabilities = inc_torch.DistillationLoss(probabilities, soft_only)(student(x), x)
    from_logits = inc_torch.DistillationLoss(teacher, soft_only)(student(x), x)
    assert float(from_probabilities) == pytest.approx(float(from_logits), rel=0.05)


def test_distilled_student_trains_in_a_plain_loop() -> None:
    teacher = trained_cnn()
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    kd = inc_torch.DistillationLoss(teacher, inc.DistillConfig(temperature=4.0, loss_weights=(0.5, 0.5)))
    _train(student, kd, torch.optim.Adam(student.parameters(), lr=3e-3), epochs=8)
    assert accuracy(student.eval()) >= 0.85


# --- bad input -----------------------------------------------------------------------------------


def test_teacher_output_shape_differs_from_student() -> None:
    kd = inc_torch.DistillationLoss(Fixed(torch.zeros(2, 7)), inc.DistillConfig())
    with pytest.raises(ConfigError, match=r"teacher's output has shape \(2, 7\).*student's logits have shape \(2, 10\)"):
        kd(torch.zeros(2, 10), torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))


def test_missing_labels_with_a_hard_weight() -> None:
    kd = inc_torch.DistillationLoss(Fixed(torch.zeros(2, 3)), inc.DistillConfig(loss_weights=(0.5, 0.5)))
    with pytest.raises(ConfigError, match="no labels were passed"):
        kd(torch.zeros(2, 3), torch.zeros(2, 1))


def test_unknown_mapped_layer_lists_close_names() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    config = inc.DistillConfig(loss_weights=(0.0, 1.0, 1.0), layer_mappings=(("00", "0"),))
    with pytest.raises(ConfigError, match=r"student layer\(s\) \['00'\] do not exist"):
        inc_torch.DistillationLoss(net, config, student=nn.Sequential(nn.Linear(2, 2)))


def test_layer_mappings_without_student() -> None:
    config = inc.DistillConfig(loss_weights=(0.0, 1.0, 1.0), layer_mappings=(("0", "0"),))
    with pytest.raises(ConfigError, match="pass student=model"):
        inc_torch.DistillationLoss(nn.Sequential(nn.Linear(2, 2)), config)


def test_mapped_layers_of_different_shapes() -> None:
    teacher, student = nn.Sequential(nn.Linear(4, 8)), nn.Sequential(nn.Linear(4, 6))
    config = inc.DistillConfig(loss_weights=(0.0, 0.0, 1.0), layer_mappings=(("0", "0"),))
    kd = inc_torch.DistillationLoss(teacher, config, student=student)
    x = torch.randn(3, 4)
    with pytest.raises(ConfigError, match=r"student layer '0' outputs \(3, 6\) but teacher layer '0' outputs \(3, 8\).*layer_projection='linear'"):
        kd(student(x), x)


def test_teacher_that_is_not_a_module() -> None:
    with pytest.raises(UnsupportedModelError, match="teacher must be a torch.nn.Module"):
        inc_torch.DistillationLoss(lambda x: x, inc.DistillConfig())  # type: ignore[arg-type]


# --- layer projection: a narrower student matched to a wider teacher ---------------------------------


class NarrowCNN(nn.Module):
    """DigitsCNN's layout at half its widths: conv2 has 8 channels (teacher 16), fc1 16 units (32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _projected() -> inc.DistillConfig:
    return inc.DistillConfig(loss_weights=(0.0, 0.0, 1.0), layer_mappings=(("0", "0"),), layer_projection="linear")


def test_a_projection_maps_the_student_width_to_the_teachers_in_the_loss() -> None:
    torch.manual_seed(0)
    # channels of a feature map (a 1x1 convolution) and the hidden size of a sequence, each as the one dimension
    # that differs; other dimensions equal
    for teacher_layer, student_layer, x in [
        (nn.Conv2d(3, 16, 3), nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6)),
        (nn.Linear(5, 12), nn.Linear(5, 6), torch.randn(2, 7, 5)),
    ]:
        teacher, student = nn.Sequential(teacher_layer), nn.Sequential(student_layer)
        kd = inc_torch.DistillationLoss(teacher, _projected(), student=student)
        assert all(isinstance(p, nn.parameter.UninitializedParameter) for p in kd.parameters())
        loss = kd(student(x), x)
        weight, bias = kd.projections[0].weight, kd.projections[0].bias
        s, t = student(x).detach(), teacher(x).detach()
        if s.ndim == 4:
            expected = nn.functional.mse_loss(nn.functional.conv2d(s, weight[:, :, None, None], bias), t)
        else:
            expected = nn.functional.mse_loss(s @ weight.T + bias, t)
        assert tuple(weight.shape) == (t.shape[1 if s.ndim == 4 else -1], s.shape[1 if s.ndim == 4 else -1])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        loss.backward()
        assert weight.grad is not None and student_layer.weight.grad is not None


def test_a_projection_between_equal_widths_starts_as_the_identity() -> None:
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Linear(4, 6)), nn.Sequential(nn.Linear(4, 6))
    kd = inc_torch.DistillationLoss(teacher, _projected(), student=student)
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = nn.functional.mse_loss(student(x), teacher(x))
    assert kd(student(x), x).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_narrower_student_learns_from_the_teachers_hidden_layers() -> None:
    # FitNets on digits: the student's conv2 (8 channels) and fc1 (16 units) are matched to the trained teacher's
    # (16 and 32) through learned projections, next to the soft and hard losses.
    teacher = trained_cnn()
    before = state(teacher)
    torch.manual_seed(0)
    student = NarrowCNN()
    config = inc.DistillConfig(
        temperature=4.0, loss_weights=(0.5, 0.5, 1.0), layer_mappings=(("conv2", "conv2"), ("fc1", "fc1")),
        layer_projection="linear",
    )
    kd = inc_torch.DistillationLoss(teacher, config, student=student)
    optimizer = torch.optim.Adam([*student.parameters(), *kd.parameters()], lr=5e-3)
    layer_losses = _train(student, kd, optimizer, epochs=12)
    assert [tuple(p.weight.shape) for p in kd.projections] == [(16, 8), (32, 16)]
    assert np.mean(layer_losses[-5:]) < 0.5 * np.mean(layer_losses[:5]), (layer_losses[:5], layer_losses[-5:])
    assert accuracy(student.eval()) >= 0.8  # 0.849 on the EPYC (hard loss alone: 0.834)
    assert same_state(state(teacher), before)


def test_projections_left_out_of_the_optimizer_are_an_error() -> None:
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Linear(4, 8)), nn.Sequential(nn.Linear(4, 3))
    kd = inc_torch.DistillationLoss(teacher, _projected(), student=student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)  # kd.parameters() forgotten
    x = torch.randn(6, 4)
    for _ in range(2):  # the first step trains the student alone; the next call sees it
        optimizer.zero_grad()
        kd(student(x), x).backward()
        optimizer.step()
    with pytest.raises(ConfigError, match=r"projections \(layer_projection='linear'\) have not: they are not in the optimizer"):
        kd(student(x), x)


def test_a_projection_maps_one_dimension_only() -> None:
    teacher, student = nn.Sequential(nn.Conv2d(3, 8, 3)), nn.Sequential(nn.Conv2d(3, 4, 5))
    kd = inc_torch.DistillationLoss(teacher, _projected(), student=student)
    x = torch.randn(2, 3, 9, 9)
    with pytest.raises(ConfigError, match=r"outputs \(2, 4, 5, 5\) and teacher layer '0' outputs \(2, 8, 7, 7\); layer_projection='linear' maps one feature dimension"):
        kd(student(x), x)
