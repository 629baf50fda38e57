"""Chain training step, fp32 vs CPU bf16 autocast, on this CPU (session 24 check)."""
import time, torch, torch.nn.functional as F
from shared.config import ChainConfig
from shared.models.second_encoder import SecondEncoder
from shared.models.noise_estimators import NoiseEstimators, make_scheduler
from shared.device import keep_freed_memory
keep_freed_memory()
cfg = ChainConfig()
torch.manual_seed(0)
e2 = SecondEncoder(4, cfg.second_encoder_channels, cfg.condition_tokens, cfg.cross_attention_dim)
est = NoiseEstimators(cfg.T, "shared", 4, 8, cfg.unet_channels, cfg.cross_attention_dim)
sched = make_scheduler(cfg.T, cfg.beta_schedule, "ddpm", prediction=cfg.prediction)
opt = torch.optim.AdamW([*e2.parameters(), *est.parameters()], lr=1e-4)
z0 = torch.randn(128, 4, 8, 8)
def step(bf16, parts):
    t = torch.randint(0, cfg.T, (128,)); eps = torch.randn_like(z0); zt = sched.add_noise(z0, eps, t)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 in ("all", "e2")):
        cond = e2(z0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 in ("all", "unet")):
        pred = est.estimators[0](zt, t, encoder_hidden_states=cond).sample
    loss = F.mse_loss(pred.float(), eps); opt.zero_grad(); loss.backward(); opt.step()
for mode in ("none", "all", "e2", "unet", "none", "all"):
    for _ in range(3): step(mode, None)
    t0 = time.perf_counter()
    for _ in range(15): step(mode, None)
    print(mode, f"{(time.perf_counter()-t0)/15*1000:.0f} ms/step", flush=True)
