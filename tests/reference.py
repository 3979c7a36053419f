"""Slow, literal re-implementations of the method doc, for tests and benchmarks to compare against.

Everything here is written straight from notebooks/method.md Sec. 2 with plain eager
PyTorch: four generator forwards, three discriminator forwards, eager loss expressions and a
per-parameter EMA loop — the structure of the official trainer. No code is shared with yoso.py
except the schedule's ᾱ table and the network-output-to-x_0 conversion, which have tests of their own.
"""
import math

import torch
import torch.nn.functional as F



def literal_G(G, x_t, t, cond, sched, cfg):
    """G_θ(x_t, t, c) written out: network output read as x_0 (Sec. 1), boundary scaling optional."""
    ab = sched.alphas_cumprod.to(t.device)[t].float().view(-1, *[1] * (x_t.ndim - 1))
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    out = G(x_t, t, cond)
    if cfg.prediction_type == "epsilon":
        x0 = (x_t - sigma * out) / alpha
    elif cfg.prediction_type == "v_prediction":
        x0 = alpha * x_t - sigma * out
    else:
        x0 = out
    if cfg.boundary_scaling:
        s = 10.0 * t.float().view(alpha.shape)
        x0 = 0.25 / (s ** 2 + 0.25) * x_t + s / (s ** 2 + 0.25).sqrt() * x0
    return x0


def literal_weights(t, t_C, sched, gamma):
    """w_con and w_rec per sample, one Python float at a time."""
    w_con, w_rec = [], []
    for ti, tci in zip(t.tolist(), t_C.tolist()):
        ab_t, ab_c = float(sched.alphas_cumprod[ti]), float(sched.alphas_cumprod[tci])
        sigma_over_alpha = lambda ab: math.inf if ab == 0 else (1 - ab) ** 0.5 / ab ** 0.5   # α = 0: zero terminal SNR
        gap = sigma_over_alpha(ab_t) - sigma_over_alpha(ab_c)
        w_con.append(gamma if gap == 0 else min(1 / gap, gamma))
        w_rec.append(min(ab_t / (1 - ab_t), gamma))
    return torch.tensor(w_con, device=t.device), torch.tensor(w_rec, device=t.device)


def naive_train_step(G, D, opt_G, opt_D, x0, cond, sched, cfg, G_ema=None):
    """The official step structure: 4 G forwards, 3 D forwards, per-parameter EMA loop."""
    B = x0.shape[0]
    # 1. one x_0, one ε, three steps
    t = torch.randint(0, cfg.T, (B,), device=x0.device)
    eps = torch.randn_like(x0)
    t_D, t_C = (t - cfg.k_D).clamp(min=0), (t - cfg.k_C).clamp(min=0)
    ab = sched.alphas_cumprod.to(x0.device).float()
    add = lambda s: ab[s].sqrt().view(-1, *[1] * (x0.ndim - 1)) * x0 + (1 - ab[s]).sqrt().view(-1, *[1] * (x0.ndim - 1)) * eps
    x_t, x_tD, x_tC = add(t), add(t_D), add(t_C)
    mean = (lambda v: v.mean(0, keepdim=True)) if cfg.gan_loss == "batch_mean" else (lambda v: v)

    # 2. D step
    for p in D.parameters():
        p.requires_grad = True
    with torch.no_grad():
        real = literal_G(G, x_tD, t_D, cond, sched, cfg)          # G forward 1
        fake = literal_G(G, x_t, t, cond, sched, cfg)             # G forward 2
    loss_D = (F.softplus(-mean(D(real, t, cond))) + F.softplus(mean(D(fake, t, cond)))).mean()   # D forwards 1, 2
    opt_D.zero_grad()
    loss_D.backward()
    opt_D.step()

    # 3. G step
    for p in D.parameters():
        p.requires_grad = False
    x0_hat = literal_G(G, x_t, t, cond, sched, cfg)               # G forward 3 (with grad)
    with torch.no_grad():
        target = literal_G(G, x_tC, t_C, cond, sched, cfg)        # G forward 4
    w_con, w_rec = literal_weights(t, t_C, sched, cfg.gamma)
    L_adv = F.softplus(-mean(D(x0_hat, t, cond))).mean()          # D forward 3
    loss = w_con * ((x0_hat - target) ** 2).flatten(1).mean(1)   # (B,), as `loss` in train_yoso_lora.py
    L_con = loss.mean()
    if cfg.rec_weight == "released":                              # train_yoso_lora.py's lines, as written:
        kl_loss = F.mse_loss(x0_hat.float(), x0.float(), reduction="none").mean(
            dim=list(range(1, len(loss.shape)))) * w_rec         # len(loss.shape) == 1: a mean over dim=[]
        L_rec = kl_loss.mean()
    else:
        L_rec = (w_rec * ((x0_hat - x0) ** 2).flatten(1).mean(1)).mean()
    loss_G = cfg.lambda_adv * L_adv + cfg.lambda_con * L_con + cfg.lambda_rec * L_rec
    opt_G.zero_grad()
    loss_G.backward()
    torch.nn.utils.clip_grad_norm_(G.parameters(), cfg.grad_clip)
    opt_G.step()
    for p in D.parameters():
        p.requires_grad = True

    # 4. EMA, one parameter at a time
    if G_ema is not None:
        with torch.no_grad():
            for pe, p in zip(G_ema.parameters(), G.parameters()):
                pe.copy_(cfg.ema_decay * pe + (1 - cfg.ema_decay) * p)
    return dict(loss_D=loss_D.item(), L_adv=L_adv.item(), L_con=L_con.item(), L_rec=L_rec.item(), loss_G=loss_G.item())


class ReleasedHead(torch.nn.Module):
    """The discriminator head of train_yoso_lora.py (its `out_head`), transcribed literally: GroupNorm32(32, C)
    (computed in float32) → SiLU → AttentionPool2d(spatial, C, 16, out) → SiLU → Linear(out, 1).
    AttentionPool2d and QKVAttention as its utils.py executes them: the mean token prepended, the (C, N + 1)
    positional embedding added, qkv by a 1x1 Conv1d, full attention over all N + 1 positions with 1/ch^(1/4) on
    q and k and a float softmax, c_proj by a 1x1 Conv1d, and the output at position 0 kept."""

    def __init__(self, C, spatial, num_head_channels=16, output_dim=512):
        super().__init__()
        self.norm = torch.nn.GroupNorm(32, C)
        self.positional_embedding = torch.nn.Parameter(torch.randn(C, spatial ** 2 + 1) / C ** 0.5)
        self.qkv_proj = torch.nn.Conv1d(C, 3 * C, 1)
        self.c_proj = torch.nn.Conv1d(C, output_dim, 1)
        self.n_heads = C // num_head_channels
        self.fc = torch.nn.Linear(output_dim, 1)

    def forward(self, x):                                         # (B, C, H, W) -> (B, 1)
        x = F.silu(self.norm(x.float()).type(x.dtype))
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None, :, :].to(x.dtype)
        qkv = self.qkv_proj(x)
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", (q * scale).view(bs * self.n_heads, ch, length),
                              (k * scale).view(bs * self.n_heads, ch, length))
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * self.n_heads, ch, length)).reshape(bs, -1, length)
        return self.fc(F.silu(self.c_proj(a)[:, :, 0]))
