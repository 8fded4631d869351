"""Diffusers pipelines as score models: the DDIM(eta) kernel against diffusers, prediction types, LoRA, export."""

import json

import pytest
import torch

from scoreaction.models.pipeline import ADAPTER, build_tiny, family_of, load_pipeline, save_lora, save_merged
from scoreaction.models.pipeline_load import NAMED
from scoreaction.paths import Discrete
from scoreaction.policy import ScoreAsAction, gaussian_log_prob
from scoreaction.samplers import get_solver
from scoreaction.tasks import make_task

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_kernel_matches_diffusers_step(ddim, eta):
    """Same x, eps and noise: our DDIM kernel's x_next equals DDIMScheduler.step(eta) to float tolerance, for
    every step of a 10-step schedule including the last (to alphas_cumprod[0]); its std is diffusers' std_dev_t
    and its log-prob the Gaussian density summed over the latent."""
    path = Discrete(ddim.alphas_cumprod.double().numpy())
    ddim.set_timesteps(10)
    steps = ddim.timesteps.tolist()
    nexts = steps[1:] + [-1]
    g = torch.Generator().manual_seed(0)
    for t, t_prev in zip(steps, nexts):
        x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
        eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
        z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
        ref = ddim.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        s0, s1 = (t + 1) / path.N, (max(t_prev, 0) + 1) / path.N if t_prev >= 0 else 1 / path.N
        mu = path.to_score("eps", eps, s0, x)
        policy = ScoreAsAction(path, lambda s, x, c=None: mu, None, eta=eta, kernel="ddim")
        out = policy.step(path.T - s0, path.T - s1, x, noise=z)
        assert torch.allclose(out.x_next, ref, atol=1e-6, rtol=1e-6), (t, float((out.x_next - ref).abs().max()))
        variance = ddim._get_variance(torch.tensor(t), torch.tensor(t_prev)).double()
        assert float(out.std) == pytest.approx(eta * float(variance.sqrt()), rel=1e-5)
        assert torch.allclose(out.log_prob, gaussian_log_prob(ref, ref - out.std * z, out.std), atol=1e-8)


def test_ddim_kernel_kl_is_the_discrete_e6(ddim):
    """The per-step KL of the DDIM kernel is ||mean - mean_pre||^2 / (2 std^2) computed from the two means."""
    path = Discrete(ddim.alphas_cumprod.double().numpy())
    g = torch.Generator().manual_seed(1)
    x, mu, pre = (torch.randn(4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    policy = ScoreAsAction(path, lambda s, x, c=None: pre, lambda s, x, c=None: mu, eta=1.0, kernel="ddim")
    t0, t1 = path.T - 0.6, path.T - 0.5
    mean, std, _, _ = policy.transition(t0, t1, x)
    mean_pre, _, _, _ = ScoreAsAction(path, lambda s, x, c=None: pre, None, eta=1.0, kernel="ddim").transition(t0, t1, x)
    expected = ((mean - mean_pre) ** 2).sum(-1) / (2 * std**2)
    assert torch.allclose(policy.kl(t0, t1, mu, pre), expected, rtol=1e-10)


def test_ddim_kernel_refuses_a_noiseless_last_step():
    path = Discrete(torch.linspace(0.999, 0.01, 100).numpy())
    policy = ScoreAsAction(path, lambda s, x, c=None: torch.zeros_like(x), None, eta=1.0, kernel="ddim")
    with pytest.raises(ValueError, match="adds no noise"):
        policy.step(path.T - 0.01, path.T, torch.zeros(2, 3))


def test_integer_timesteps_on_the_scheduler_knots():
    path = Discrete(torch.linspace(0.999, 0.01, 1000).numpy())
    s = torch.linspace(0, 1, 21, dtype=torch.float64)[1:]
    steps = path.timestep(s)
    assert torch.equal(steps, steps.round()) and float(steps[12]) == 649.0


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd3"])
def test_tiny_pipelines_are_deterministic_and_typed(model):
    a, b = build_tiny(model, seed=3), build_tiny(model, seed=3)
    family, path, prediction = family_of(a)
    assert (family, prediction) == (("unet", "eps") if model == "tiny-sd" else ("sd3", "velocity"))
    net_a, net_b = (p.unet if family == "unet" else p.transformer for p in (a, b))
    assert all(torch.equal(u, v) for u, v in zip(net_a.state_dict().values(), net_b.state_dict().values()))


def test_v_prediction_converts_to_the_same_score():
    """A v-prediction network whose output is alpha eps - sigma x0 gives the same score as the eps network."""
    task = make_task("diffusers", {"guidance_scale": 1.0})
    eps_score = task.pretrained
    v_score = task.score_model(adapters=False)
    v_score.prediction = "v"
    path, s = task.path, torch.full((2,), 0.4, dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8)
    cond = torch.tensor([0, 1])
    with torch.no_grad():
        eps = eps_score.network(s, x, task.prompts.embed(cond, "cpu"))
        a, sg = float(path.alpha(0.4)), float(path.sigma(0.4))
        x0 = (x - sg * eps) / a
        v = a * eps - sg * x0
        assert torch.allclose(v_score.to_score(v, s, x), eps_score(s, x, cond), atol=1e-4)


def test_loading_errors_are_one_line(tmp_path):
    cases = {str(tmp_path / "missing"): "no such folder", str(tmp_path): "model_index.json"}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text(json.dumps({"text_encoder": ["x", "y"]}))
    cases[str(tmp_path / "bad")] = "'unet' or 'transformer'"
    for model, message in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            load_pipeline(model)
        assert "\n" not in str(err.value)


def test_unsupported_scheduler_and_prediction(tmp_path):
    pipe = build_tiny("tiny-sd")
    pipe.save_pretrained(tmp_path / "sd")
    config = tmp_path / "sd" / "scheduler" / "scheduler_config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps({**values, "prediction_type": "mystery"}))
    with pytest.raises(ValueError, match="unsupported prediction type 'mystery'"):
        family_of(load_pipeline(str(tmp_path / "sd")))
    from diffusers import DDIMScheduler

    pipe.transformer = None
    pipe.unet, unet = None, pipe.unet
    with pytest.raises(ValueError, match="neither a unet nor a transformer"):
        family_of(pipe)
    pipe.unet, pipe.scheduler = unet, DDIMScheduler()
    pipe.scheduler.alphas_cumprod = None
    with pytest.raises(ValueError, match="unsupported scheduler"):
        family_of(pipe)


def perturbed_lora_task(model: str, guidance: float = 3.0):
    task = make_task("diffusers", {"model": model, "guidance_scale": guidance})
    action = task.make_action()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in action.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return task, action


def test_lora_reference_is_the_same_network_with_adapters_off():
    task, action = perturbed_lora_task("tiny-sd")
    trainable = [n for n, p in action.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not list(task.pretrained.parameters())  # shares the network, registers nothing
    x, cond = torch.randn(2, 4, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        tuned, pre = action(0.5, x, cond), task.pretrained(0.5, x, cond)
        task.denoiser.disable_adapters()
        base = action(0.5, x, cond)
        task.denoiser.enable_adapters()
    assert not torch.allclose(tuned, pre, atol=1e-3)
    assert torch.equal(pre, base)


@pytest.mark.parametrize("model", ["tiny-sd", "shapes"])
def test_export_lora_reproduces_samples_in_stock_diffusers(tmp_path, model):
    """save_lora -> a fresh stock pipeline's load_lora_weights -> its own DDIM sampling (eta = 0, guidance 3) gives
    the fine-tuned policy's samples under our DDIM solver on the scheduler grid; merged weights do too. On a random
    pipeline and on the shipped shapes model (loaded by stock diffusers from its folder)."""
    from diffusers import StableDiffusionPipeline

    task, action = perturbed_lora_task(model)
    save_lora(task.pipe, task.family, task.denoiser, tmp_path / "lora")
    save_merged(task.pipe, task.denoiser, tmp_path / "merged")
    if model == "shapes":
        stock = StableDiffusionPipeline.from_pretrained(str(NAMED["shapes"]), local_files_only=True)
    else:
        stock = build_tiny(model)
    stock.load_lora_weights(str(tmp_path / "lora"))
    merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    prompts = ["a cat", "a red circle"] if model == "tiny-sd" else ["a red circle", "a square left of a triangle"]
    x0 = torch.randn(2, *task.shape, generator=torch.Generator().manual_seed(1))
    cond, ts = task.add_prompts(prompts), task.grid("scheduler", 6)
    with torch.no_grad():
        ours = get_solver("ddim").sample(task.path, action, x0, ts, cond=cond, eta=0.0)
        pre = get_solver("ddim").sample(task.path, task.pretrained, x0, ts, cond=cond, eta=0.0)
        for pipe in (stock, merged):
            ref = pipe(prompts, latents=x0.clone(), num_inference_steps=6, guidance_scale=3.0, eta=0.0,
                       output_type="latent").images
            assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), float((ours - ref).abs().max())  # float32 round-off
    assert (ours - pre).abs().max() > 0.1  # the LoRA matters


def test_export_lora_sd3_network_matches_stock(tmp_path):
    """SD3: the exported LoRA loaded into a stock transformer gives the fine-tuned network's outputs."""
    task, action = perturbed_lora_task("tiny-sd3", guidance=1.0)
    save_lora(task.pipe, task.family, task.denoiser, tmp_path)
    stock = build_tiny("tiny-sd3")
    stock.load_lora_weights(str(tmp_path))
    x, cond = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    s = torch.full((2,), 0.5, dtype=torch.float64)
    kwargs = task.prompts.embed(cond, "cpu")
    with torch.no_grad():
        ours = action.network(s, x, kwargs)
        theirs = stock.transformer(hidden_states=x, timestep=torch.full((2,), 500.0), return_dict=False, **kwargs)[0]
        pre = task.pretrained.network(s, x, kwargs)
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(ours, pre, atol=1e-3)
    assert ADAPTER in task.denoiser.peft_config


def test_flow_step_is_the_flow_match_euler_step():
    """On the rectified-flow path, the DDIM kernel with eta = 0 is FlowMatchEulerDiscreteScheduler's step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    task = make_task("diffusers", {"model": "tiny-sd3", "guidance_scale": 1.0})
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(2)
    for k in range(1, 4):
        s0, s1 = float(scheduler.sigmas[k]), float(scheduler.sigmas[k + 1])
        x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        scheduler._step_index = k
        ref = scheduler.step(v, scheduler.timesteps[k], x, return_dict=False)[0]
        score = task.path.to_score("velocity", v.double(), s0, x.double())
        from scoreaction.sde import exponential_step

        ours = exponential_step(task.path, s0, s1, x.double(), score)
        assert torch.allclose(ours.float(), ref, atol=1e-5)
