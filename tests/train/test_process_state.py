"""torch's process-wide settings (threads, deterministic algorithms, the generator) hold for a run only."""

import pytest
import torch

from sdmoe.errors import UserError
from sdmoe.train import step as step_module
from sdmoe.train.config import LoopConfig
from sdmoe.train.loop import NonFiniteError, train
from sdmoe.train.process_state import process_state


@pytest.fixture()
def caller_state():
    """A caller's own settings, unlike any run's: 3 threads, deterministic algorithms off; put back after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(3)
    torch.use_deterministic_algorithms(False)
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _state():
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_rng_state())


def _assert_as_before(before):
    threads, deterministic, warn_only, rng = _state()
    assert (threads, deterministic, warn_only) == before[:3]
    assert torch.equal(rng, before[3])


def test_the_block_sets_the_loop_settings_and_puts_them_back(caller_state):
    before = _state()
    with process_state(LoopConfig(threads=1, deterministic=True, seed=7)):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        drawn = torch.rand(3)
    _assert_as_before(before)
    assert torch.equal(drawn, torch.rand(3, generator=torch.Generator().manual_seed(7)))  # seeded with loop.seed


def test_threads_0_keeps_the_count_and_deterministic_false_turns_the_flag_off(caller_state):
    torch.use_deterministic_algorithms(True)  # warn_only=False: put back as it was, not as the run set it
    before = _state()
    with process_state(LoopConfig(threads=0, deterministic=False)):
        assert torch.get_num_threads() == 3
        assert not torch.are_deterministic_algorithms_enabled()
    _assert_as_before(before)


def test_put_back_when_the_block_raises(caller_state):
    before = _state()
    with pytest.raises(UserError), process_state(LoopConfig(threads=1, seed=3)):
        torch.rand(5)
        raise UserError("the run failed")
    _assert_as_before(before)


def _spy_on_steps(monkeypatch) -> list:
    """(threads, deterministic algorithms) at every training step."""
    seen, real = [], step_module.TrainStep.__call__

    def spy(self, input_ids):
        seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        return real(self, input_ids)

    monkeypatch.setattr(step_module.TrainStep, "__call__", spy)
    return seen


def test_a_run_leaves_the_process_as_it_found_it(tmp_path, tiny_config, tiny_dataset, caller_state, monkeypatch):
    """loop.threads=1 and deterministic algorithms for the run; the caller's 3 threads, flag and generator after."""
    tiny_config.loop.steps, tiny_config.loop.threads, tiny_config.loop.eval_every = 3, 1, 3
    seen = _spy_on_steps(monkeypatch)
    before = _state()
    train(tiny_config, tmp_path / "run", progress=False, dataset=tiny_dataset)
    assert seen == [(1, True)] * 3
    _assert_as_before(before)


def test_the_next_run_in_the_process_does_not_inherit_the_threads(tmp_path, tiny_config, tiny_dataset, caller_state,
                                                                  monkeypatch):
    """A compare trains its runs in one process: a run with loop.threads=0 runs on the caller's thread count,
    whatever the run before it set."""
    tiny_config.loop.steps, tiny_config.loop.eval_every, tiny_config.loop.threads = 2, 2, 1
    train(tiny_config, tmp_path / "a", progress=False, dataset=tiny_dataset)
    tiny_config.loop.threads = 0
    seen = _spy_on_steps(monkeypatch)
    train(tiny_config, tmp_path / "b", progress=False, dataset=tiny_dataset)
    assert seen == [(3, True)] * 2


def test_a_run_that_fails_leaves_the_process_as_it_found_it(tmp_path, tiny_config, tiny_dataset, caller_state,
                                                           monkeypatch):
    tiny_config.loop.threads = 1
    real = step_module.causal_lm_loss
    monkeypatch.setattr(step_module, "causal_lm_loss", lambda logits, ids: real(logits, ids) * float("nan"))
    before = _state()
    with pytest.raises(NonFiniteError):
        train(tiny_config, tmp_path / "run", progress=False, dataset=tiny_dataset)
    _assert_as_before(before)


@pytest.mark.gpu
def test_the_run_devices_generator_is_seeded_and_put_back():
    """On a GPU its generator too (`cuda:N`, or plain `cuda`: the current device); the CPU only in the dry run."""
    gpu = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = (lambda: torch.cuda.get_rng_state(gpu)) if gpu.type == "cuda" else torch.get_rng_state
    before = state()
    with process_state(LoopConfig(seed=5), gpu):
        drawn = torch.rand(4, device=gpu)
    assert torch.equal(state(), before)
    indexed = torch.device("cuda", torch.cuda.current_device()) if gpu.type == "cuda" else gpu
    with process_state(LoopConfig(seed=5), indexed):
        assert torch.equal(torch.rand(4, device=gpu), drawn)
    assert torch.equal(state(), before)
