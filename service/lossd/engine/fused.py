"""Fused CPU kernels: one pass over the boxes computing the loss and its analytic gradient, compiled by numba.

The reference (the autograd functions in box_losses.py / regression.py) defines every value; these kernels
are a faster route to the same numbers and are tested against it to 1e-9 in float64. The gradients follow
torch's conventions at the non-smooth points too: min/max split a tie 0.5/0.5, |x| has gradient 0 at 0, and the
intersection follows torchvision's strict mask (zero gradient unless both overlaps are > 0, so boxes that touch
along an edge or at a corner get none through it).

Divisions follow numpy's error model: a zero denominator (possible only with eps = 0) gives the reference's
inf or NaN for that row rather than an exception.

A kernel also validates its rows (finite values, x1 <= x2, y1 <= y2) in the same pass and reports a status;
on any problem the engine re-runs the reference validation, which names the field and the rows.
"""

from __future__ import annotations

import math

from numba import njit, prange

# loss kinds and modes (ints: numba specialises on them cheaply)
IOU, GIOU, DIOU, CIOU, EIOU, SIOU, MPDIOU, WIOU, INNER, ALPHA = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9
LINEAR, LOG, SQUARE = 0, 1, 2
FORMATS = {"xyxy": 0, "xywh": 1, "cxcywh": 2}
OK, BAD_PRED, BAD_TARGET, INVERTED_PRED, INVERTED_TARGET = 0, 1, 2, 3, 4
K_ASPECT = 4.0 / math.pi**2
PARALLEL_MIN_ROWS = 4096
# Everything but the flags that assume no NaN/inf: the kernels' own finiteness checks must survive.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _lo(a, b):
    """d min(a, b) / da, torch's convention (a tie splits). Branch-free: on random boxes these comparisons
    are coin flips, and mispredicted branches cost more than the arithmetic."""
    return (a < b) * 1.0 + (a == b) * 0.5


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _sign(a):
    return (a > 0) * 1.0 - (a < 0) * 1.0


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _to_xyxy(a, b, c, d, fmt):
    if fmt == 1:
        return a, b, a + c, b + d
    if fmt == 2:
        return a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    return a, b, c, d


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _from_xyxy_grad(g0, g1, g2, g3, fmt):
    """Chain rule from d/d(x1, y1, x2, y2) back to the caller's format."""
    if fmt == 1:
        return g0 + g2, g1 + g3, g2, g3
    if fmt == 2:
        return g0 + g2, g1 + g3, 0.5 * (g2 - g0), 0.5 * (g3 - g1)
    return g0, g1, g2, g3


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _pow_and_below(q, theta):
    """(q ** theta, q ** (theta - 1)) for q >= 0; SIoU's default theta = 4 by multiplication (two pow calls
    cost more than the rest of the loss)."""
    if theta == 4.0:
        q2 = q * q
        return q2 * q2, q2 * q
    return q**theta, q ** (theta - 1.0)


# ---------------------------------------------------------------------------------------------------------------
# one helper per box loss: (loss, then its partials with respect to the shared quantities)
#     (loss, g_iou, g_union, g_w1, g_h1, g_cw, g_ch, g_dx, g_dy, g_cx1, g_cy1, g_cx2, g_cy2)
# iou, union: the pair's IoU and union; w1, h1: the pred's sides; cw, ch: the enclosing box's sides; dx, dy: target
# centre - pred centre; cx1 .. cy2: the pred's corners straight (MPDIoU). box_loss_grad chains them to the corners.

@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _partials(loss, g_iou, g_union, g_w1, g_h1, g_cw, g_ch, g_dx, g_dy):
    return loss, g_iou, g_union, g_w1, g_h1, g_cw, g_ch, g_dx, g_dy, 0.0, 0.0, 0.0, 0.0


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def ciou_alpha(iou, v, eps):
    """CIoU's alpha = v / (1 - IoU + v + eps), and 0 where v = 0: alpha v -> 0 there on every path, while the
    quotient is 0/0 for identical boxes when eps = 0."""
    return v / (1.0 - iou + v + eps) if v > 0.0 else 0.0


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def aspect_v(w1, h1, w2, h2, eps):
    """CIoU's v = 4/pi^2 (atan(w2/(h2 + eps)) - atan(w1/(h1 + eps)))^2 with dv/dw1, dv/dh1 (the one place it is
    written: CIoU, Alpha-IoU's ciou penalty and the ciou metric use it). The difference of atans is one atan:
    atan a - atan b = atan((a - b) / (1 + ab)) for ab > -1, and both ratios are >= 0 here; half the
    transcendental work, and no cancellation when a ~ b."""
    hh1 = h1 + eps
    hh2 = h2 + eps
    da = math.atan((w2 * hh1 - w1 * hh2) / (hh2 * hh1 + w2 * w1))
    g = -2.0 * K_ASPECT * da / (hh1 * hh1 + w1 * w1)
    return K_ASPECT * da * da, g * hh1, -g * w1


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _distance_penalty(cw, ch, dx, dy, eps):
    """DIoU's rho^2 / (c^2 + eps) and its partials (dx, dy, cw, ch)."""
    D = cw * cw + ch * ch + eps
    R = dx * dx + dy * dy
    g_D = -R / (D * D)
    return R / D, 2.0 * dx / D, 2.0 * dy / D, g_D * 2.0 * cw, g_D * 2.0 * ch


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _iou_loss(mode, iou, eps):
    if mode == LINEAR:
        return _partials(1.0 - iou, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    if mode == SQUARE:
        return _partials(1.0 - iou * iou, -2.0 * iou, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    floor = max(eps, 1e-12)  # log: floored at eps, where the gradient is 0
    if iou >= floor:
        return _partials(-math.log(iou), -1.0 / iou, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    return _partials(-math.log(floor), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _giou_loss(iou, union, cw, ch, eps):
    C = cw * ch
    g_C = (union + eps) / ((C + eps) * (C + eps))
    return _partials(1.0 - iou + (C - union) / (C + eps), -1.0, -1.0 / (C + eps), 0.0, 0.0, g_C * ch, g_C * cw,
                     0.0, 0.0)


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _diou_ciou_loss(ciou, alpha_rule, iou, w1, h1, w2, h2, cw, ch, dx, dy, eps):
    """DIoU, or CIoU with its detached alpha (alpha_rule 0 torchvision, 1 mmdet: 0 unless IoU > 0.5)."""
    P, g_dx, g_dy, g_cw, g_ch = _distance_penalty(cw, ch, dx, dy, eps)
    loss = 1.0 - iou + P
    g_w1 = 0.0
    g_h1 = 0.0
    if ciou:
        v, v_w1, v_h1 = aspect_v(w1, h1, w2, h2, eps)
        alpha = ciou_alpha(iou, v, eps)
        if alpha_rule == 1 and not iou > 0.5:
            alpha = 0.0
        loss += alpha * v  # alpha is detached: it scales v's gradient only
        g_w1 = alpha * v_w1
        g_h1 = alpha * v_h1
    return _partials(loss, -1.0, 0.0, g_w1, g_h1, g_cw, g_ch, g_dx, g_dy)


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _eiou_loss(iou, w1, h1, w2, h2, cw, ch, dx, dy, eps, gamma):
    P, p_dx, p_dy, p_cw, p_ch = _distance_penalty(cw, ch, dx, dy, eps)
    Ew = cw * cw + eps
    Eh = ch * ch + eps
    dw = w1 - w2
    dh = h1 - h2
    f = 1.0 if gamma == 0 else max(iou, 0.0) ** gamma  # the focal weight is detached
    loss = f * (1.0 - iou + P + dw * dw / Ew + dh * dh / Eh)
    return _partials(loss, -f, 0.0, f * 2.0 * dw / Ew, f * 2.0 * dh / Eh,
                     f * (p_cw - dw * dw / (Ew * Ew) * 2.0 * cw), f * (p_ch - dh * dh / (Eh * Eh) * 2.0 * ch),
                     f * p_dx, f * p_dy)


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _siou_loss(iou, w1, h1, w2, h2, cw, ch, dx, dy, eps, theta):
    ax = abs(dx)
    ay = abs(dy)
    # Lambda = sin(2 alpha) = 2 |dx| |dy| / sigma^2 exactly, eps-free; 0 for coincident centres, where it
    # multiplies rho = 0 (S = 1 there only keeps the division finite)
    S = dx * dx + dy * dy
    if not S > 0.0:
        S = 1.0
    angle = 2.0 * ax * ay / S
    gamma = 2.0 - angle
    Ex = cw * cw + eps
    Ey = ch * ch + eps
    rx = dx * dx / Ex
    ry = dy * dy / Ey
    ex = math.exp(-gamma * rx)
    ey = math.exp(-gamma * ry)
    mw = max(w1, w2)
    mh = max(h1, h2)
    adw = abs(w1 - w2)
    adh = abs(h1 - h2)
    mwe = mw + eps
    mhe = mh + eps
    qw = 1.0 - math.exp(-adw / mwe)
    qh = 1.0 - math.exp(-adh / mhe)
    qwt, qwt1 = _pow_and_below(qw, theta)
    qht, qht1 = _pow_and_below(qh, theta)
    loss = 1.0 - iou + 0.5 * ((1.0 - ex) + (1.0 - ey) + qwt + qht)
    g_angle = -0.5 * (rx * ex + ry * ey)  # through gamma = 2 - angle
    g_rx = 0.5 * gamma * ex
    g_ry = 0.5 * gamma * ey
    g_S = -g_angle * angle / S
    g_dx = g_angle * 2.0 * ay / S * _sign(dx) + g_S * 2.0 * dx + g_rx * 2.0 * dx / Ex
    g_dy = g_angle * 2.0 * ax / S * _sign(dy) + g_S * 2.0 * dy + g_ry * 2.0 * dy / Ey
    g_ow = 0.5 * theta * qwt1 * (1.0 - qw)
    g_oh = 0.5 * theta * qht1 * (1.0 - qh)
    g_w1 = g_ow * (_sign(w1 - w2) / mwe - adw / (mwe * mwe) * _lo(w2, w1))
    g_h1 = g_oh * (_sign(h1 - h2) / mhe - adh / (mhe * mhe) * _lo(h2, h1))
    return _partials(loss, -1.0, 0.0, g_w1, g_h1, -g_rx * rx / Ex * 2.0 * cw, -g_ry * ry / Ey * 2.0 * ch, g_dx, g_dy)


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _mpdiou_loss(enclosing, iou, x1, y1, x2, y2, X1, Y1, X2, Y2, cw, ch, eps, image_norm):
    """normaliser: the image's w^2 + h^2 (image_norm), or the enclosing box's squared diagonal."""
    ex1 = x1 - X1
    ey1 = y1 - Y1
    ex2 = x2 - X2
    ey2 = y2 - Y2
    d = ex1 * ex1 + ey1 * ey1 + ex2 * ex2 + ey2 * ey2
    norm = image_norm
    g_cw = 0.0
    g_ch = 0.0
    if enclosing:
        norm = cw * cw + ch * ch + eps
        g_norm = -d / (norm * norm)
        g_cw = g_norm * 2.0 * cw
        g_ch = g_norm * 2.0 * ch
    return (1.0 - iou + d / norm, -1.0, 0.0, 0.0, 0.0, g_cw, g_ch, 0.0, 0.0, 2.0 * ex1 / norm, 2.0 * ey1 / norm,
            2.0 * ex2 / norm, 2.0 * ey2 / norm)


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _wiou_loss(version, iou, cw, ch, dx, dy, eps, iou_mean, gamma_or_alpha, delta):
    """version 0 v1, 1 v2 (gamma), 2 v3 (alpha, delta)."""
    R = dx * dx + dy * dy
    Ds = cw * cw + ch * ch + eps  # detached: no gradient through the enclosing box
    E = math.exp(R / Ds)
    l_iou = 1.0 - iou
    f = 1.0  # the focusing factor, detached
    if version == 1:
        f = (l_iou / iou_mean) ** gamma_or_alpha
    elif version == 2:
        b = l_iou / iou_mean
        f = b / (delta * gamma_or_alpha ** (b - delta))
    g_R = f * E * l_iou / Ds
    return _partials(f * E * l_iou, -f * E, 0.0, 0.0, 0.0, 0.0, 0.0, g_R * 2.0 * dx, g_R * 2.0 * dy)


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _alpha_iou_loss(penalty, iou, union, w1, h1, w2, h2, cw, ch, dx, dy, eps, a):
    """penalty 0 none, 1 giou, 2 diou, 3 ciou; each term raised to a."""
    ia, ia1 = _pow_and_below(iou, a)
    loss = 1.0 - ia
    g_union = 0.0
    g_w1 = 0.0
    g_h1 = 0.0
    g_cw = 0.0
    g_ch = 0.0
    g_dx = 0.0
    g_dy = 0.0
    if penalty == 1:  # ((C - union) / (C + eps)).clamp(min=0) ** a; the clamp passes the gradient at 0
        C = cw * ch
        G = (C - union) / (C + eps)
        if G >= 0.0:
            Ga, Ga1 = _pow_and_below(G, a)
            loss += Ga
            g_G = a * Ga1
            g_C = g_G * (union + eps) / ((C + eps) * (C + eps))
            g_union = -g_G / (C + eps)
            g_cw = g_C * ch
            g_ch = g_C * cw
    elif penalty >= 2:  # (rho^2 / c^2) ** a, and for ciou (beta v) ** a with CIoU's beta detached
        P, p_dx, p_dy, p_cw, p_ch = _distance_penalty(cw, ch, dx, dy, eps)
        Pa, Pa1 = _pow_and_below(P, a)
        loss += Pa
        g_P = a * Pa1
        g_dx = g_P * p_dx
        g_dy = g_P * p_dy
        g_cw = g_P * p_cw
        g_ch = g_P * p_ch
        if penalty == 3:
            v, v_w1, v_h1 = aspect_v(w1, h1, w2, h2, eps)
            beta = ciou_alpha(iou, v, eps)
            Ba, Ba1 = _pow_and_below(beta * v, a)
            loss += Ba
            g_w1 = a * Ba1 * beta * v_w1
            g_h1 = a * Ba1 * beta * v_h1
    return _partials(loss, -a * ia1, g_union, g_w1, g_h1, g_cw, g_ch, g_dx, g_dy)


# compiled once per dtype and linked into each kernel. Inlined at numba's level instead, each of the six kernel
# specialisations compiled every loss's branch again: a cold start of 33 s instead of 16 s on 2 cores, for loss +
# gradient times within the noise (Inner-IoU at 1M pairs ~15% faster)
@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def box_loss_grad(kind, mode, x1, y1, x2, y2, X1, Y1, X2, Y2, eps, p1, p2, p3):
    """(loss, d/dx1, d/dy1, d/dx2, d/dy2) of one pred box against one target box, all xyxy: the geometry both
    boxes share, one loss helper above, and the chain rule back to the corners.
    mode: IoU's linear/log/square, CIoU's alpha rule (0 torchvision, 1 mmdet), MPDIoU's normaliser (0 image,
    1 enclosing box), WIoU's version (0 v1, 1 v2, 2 v3), Alpha-IoU's penalty (0 none, 1 giou, 2 diou, 3 ciou).
    p1: EIoU's gamma, SIoU's theta, MPDIoU's image w^2 + h^2, WIoU's iou_mean, Alpha-IoU's alpha; p2: WIoU's gamma
    (v2) or alpha (v3); p3: WIoU's delta (v3)."""
    w1 = x2 - x1
    h1 = y2 - y1
    w2 = X2 - X1
    h2 = Y2 - Y1
    iw_raw = min(x2, X2) - max(x1, X1)
    ih_raw = min(y2, Y2) - max(y1, Y1)
    iw = max(iw_raw, 0.0)
    ih = max(ih_raw, 0.0)
    inter = iw * ih
    union = w1 * h1 + w2 * h2 - inter
    U = union + eps
    iou = inter / U
    cw = max(x2, X2) - min(x1, X1)
    ch = max(y2, Y2) - min(y1, Y1)
    dx = 0.5 * ((X1 + X2) - (x1 + x2))
    dy = 0.5 * ((Y1 + Y2) - (y1 + y2))

    if kind == IOU:
        t = _iou_loss(mode, iou, eps)
    elif kind == GIOU:
        t = _giou_loss(iou, union, cw, ch, eps)
    elif kind == DIOU or kind == CIOU:
        t = _diou_ciou_loss(kind == CIOU, mode, iou, w1, h1, w2, h2, cw, ch, dx, dy, eps)
    elif kind == EIOU:
        t = _eiou_loss(iou, w1, h1, w2, h2, cw, ch, dx, dy, eps, p1)
    elif kind == SIOU:
        t = _siou_loss(iou, w1, h1, w2, h2, cw, ch, dx, dy, eps, p1)
    elif kind == MPDIOU:
        t = _mpdiou_loss(mode == 1, iou, x1, y1, x2, y2, X1, Y1, X2, Y2, cw, ch, eps, p1)
    elif kind == WIOU:
        t = _wiou_loss(mode, iou, cw, ch, dx, dy, eps, p1, p2, p3)
    else:  # ALPHA
        t = _alpha_iou_loss(mode, iou, union, w1, h1, w2, h2, cw, ch, dx, dy, eps, p1)
    loss, g_iou, g_union, g_w1, g_h1, g_cw, g_ch, g_dx, g_dy, g_cx1, g_cy1, g_cx2, g_cy2 = t

    # back through iou = inter / (union + eps), union = w1 h1 + w2 h2 - inter, inter = iw ih
    g_inter = g_iou / U
    g_union -= g_iou * inter / (U * U)
    g_inter -= g_union
    g_w1 += g_union * h1
    g_h1 += g_union * w1
    overlap = (iw_raw > 0) * (ih_raw > 0)  # torchvision's strict mask: no gradient through a touching edge
    g_iw = g_inter * ih * overlap
    g_ih = g_inter * iw * overlap
    gx1 = -g_iw * _lo(X1, x1)  # iw = min(x2, X2) - max(x1, X1)
    gx2 = g_iw * _lo(x2, X2)
    gy1 = -g_ih * _lo(Y1, y1)
    gy2 = g_ih * _lo(y2, Y2)
    gx2 += g_w1 + g_cw * _lo(X2, x2)  # cw = max(x2, X2) - min(x1, X1)
    gx1 += -g_w1 - g_cw * _lo(x1, X1)
    gy2 += g_h1 + g_ch * _lo(Y2, y2)
    gy1 += -g_h1 - g_ch * _lo(y1, Y1)
    gx1 += g_cx1 - 0.5 * g_dx
    gx2 += g_cx2 - 0.5 * g_dx
    gy1 += g_cy1 - 0.5 * g_dy
    gy2 += g_cy2 - 0.5 * g_dy
    return loss, gx1, gy1, gx2, gy2


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _row_status(p, t, i, fmt):
    # x * 0 is 0 for every finite x and NaN for inf/NaN: one comparison checks four values, branch-free
    if not (p[i, 0] * 0.0 + p[i, 1] * 0.0 + p[i, 2] * 0.0 + p[i, 3] * 0.0) == 0.0:
        return BAD_PRED
    if not (t[i, 0] * 0.0 + t[i, 1] * 0.0 + t[i, 2] * 0.0 + t[i, 3] * 0.0) == 0.0:
        return BAD_TARGET
    if fmt == 0:
        if p[i, 2] < p[i, 0] or p[i, 3] < p[i, 1]:
            return INVERTED_PRED
        if t[i, 2] < t[i, 0] or t[i, 3] < t[i, 1]:
            return INVERTED_TARGET
    else:
        if p[i, 2] < 0 or p[i, 3] < 0:
            return INVERTED_PRED
        if t[i, 2] < 0 or t[i, 3] < 0:
            return INVERTED_TARGET
    return OK


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _iou_loss_grad(x1, y1, x2, y2, X1, Y1, X2, Y2, eps):
    """(1 - IoU, its gradient) alone: the terms Inner-IoU adds to its base loss."""
    iw_raw = min(x2, X2) - max(x1, X1)
    ih_raw = min(y2, Y2) - max(y1, Y1)
    iw = max(iw_raw, 0.0)
    ih = max(ih_raw, 0.0)
    inter = iw * ih
    w1 = x2 - x1
    h1 = y2 - y1
    U = w1 * h1 + (X2 - X1) * (Y2 - Y1) - inter + eps
    g_inter = -1.0 / U
    g_union = inter / (U * U)
    g_inter -= g_union
    overlap = (iw_raw > 0) * (ih_raw > 0)
    g_iw = g_inter * ih * overlap
    g_ih = g_inter * iw * overlap
    gx1 = -g_iw * _lo(X1, x1) - g_union * h1
    gx2 = g_iw * _lo(x2, X2) + g_union * h1
    gy1 = -g_ih * _lo(Y1, y1) - g_union * w1
    gy2 = g_ih * _lo(y2, Y2) + g_union * w1
    return 1.0 - inter / U, gx1, gy1, gx2, gy2


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _scaled(a, b, ratio):
    """The side a..b scaled by ratio about its centre, as the reference writes it."""
    c = 0.5 * (a + b)
    half = 0.5 * ratio * (b - a)
    return c - half, c + half


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _inner_terms(x1, y1, x2, y2, X1, Y1, X2, Y2, eps, ratio):
    """(1 - IoU_inner, its gradient back on the unscaled pred), IoU_inner the IoU of both boxes scaled by ratio
    about their centres."""
    sx1, sx2 = _scaled(x1, x2, ratio)
    sy1, sy2 = _scaled(y1, y2, ratio)
    SX1, SX2 = _scaled(X1, X2, ratio)
    SY1, SY2 = _scaled(Y1, Y2, ratio)
    l_in, h1, h2, h3, h4 = _iou_loss_grad(sx1, sy1, sx2, sy2, SX1, SY1, SX2, SY2, eps)
    # back through the scaling: s1 = x1 (1 + r) / 2 + x2 (1 - r) / 2, s2 = x1 (1 - r) / 2 + x2 (1 + r) / 2
    a = 0.5 * (1.0 + ratio)
    b = 0.5 * (1.0 - ratio)
    return l_in, h1 * a + h3 * b, h2 * a + h4 * b, h1 * b + h3 * a, h2 * b + h4 * a


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _box_row(kind, mode, fmt, p, t, w, scale, eps, p1, p2, p3, loss, grad, i, want_grad):
    x1, y1, x2, y2 = _to_xyxy(p[i, 0], p[i, 1], p[i, 2], p[i, 3], fmt)
    X1, Y1, X2, Y2 = _to_xyxy(t[i, 0], t[i, 1], t[i, 2], t[i, 3], fmt)
    # Inner-IoU's base loss comes from the same box_loss_grad call as every other loss: mode is its base (iou, giou,
    # diou, ciou with torchvision's alpha rule), p1 its ratio
    inner = kind == INNER
    v, g0, g1, g2, g3 = box_loss_grad(mode if inner else kind, 0 if inner else mode, x1, y1, x2, y2, X1, Y1, X2,
                                      Y2, eps, 0.0 if inner else p1, p2, p3)
    if inner:
        # 1 - IoU_inner (base iou), else L_base + IoU - IoU_inner = L_base - (1 - IoU) + (1 - IoU_inner)
        vn, h0, h1, h2, h3 = _inner_terms(x1, y1, x2, y2, X1, Y1, X2, Y2, eps, p1)
        if mode == IOU:
            v, g0, g1, g2, g3 = vn, h0, h1, h2, h3
        else:
            vi, i0, i1, i2, i3 = _iou_loss_grad(x1, y1, x2, y2, X1, Y1, X2, Y2, eps)
            v, g0, g1, g2, g3 = v - vi + vn, g0 - i0 + h0, g1 - i1 + h1, g2 - i2 + h2, g3 - i3 + h3
    wi = w[i] if w.shape[0] > 0 else 1.0
    loss[i] = v * wi
    if want_grad:
        s = wi * scale
        g0, g1, g2, g3 = _from_xyxy_grad(g0, g1, g2, g3, fmt)
        grad[i, 0] = g0 * s
        grad[i, 1] = g1 * s
        grad[i, 2] = g2 * s
        grad[i, 3] = g3 * s


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def box_kernel(kind, mode, fmt, p, t, w, scale, eps, p1, p2, p3, loss, grad, want_grad):
    """Serial: validate every row first (so nothing is computed on bad input), then compute."""
    n = p.shape[0]
    for i in range(n):
        s = _row_status(p, t, i, fmt)
        if s != OK:
            return s
    for i in range(n):
        _box_row(kind, mode, fmt, p, t, w, scale, eps, p1, p2, p3, loss, grad, i, want_grad)
    return OK


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", parallel=True)
def box_kernel_parallel(kind, mode, fmt, p, t, w, scale, eps, p1, p2, p3, loss, grad, want_grad):
    """One pass: each row is checked and computed together; a bad row's status discards the whole result."""
    n = p.shape[0]
    bad = 0
    for i in prange(n):
        s = _row_status(p, t, i, fmt)
        if s == OK:
            _box_row(kind, mode, fmt, p, t, w, scale, eps, p1, p2, p3, loss, grad, i, want_grad)
        else:
            bad += 1
    if bad:
        for i in range(n):
            s = _row_status(p, t, i, fmt)
            if s != OK:
                return s
    return OK


# ---------------------------------------------------------------------------------------------------------------
# coordinate regression losses on z = pred - target, summed over each row's D values

L1, L2, MSE, SMOOTH_L1, HUBER = 0, 1, 2, 3, 4


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _coord(kind, z, beta):
    a = abs(z)
    if kind == L1:
        return a, _sign(z)
    if kind == L2:
        return 0.5 * z * z, z
    if kind == MSE:
        return z * z, 2.0 * z
    if kind == SMOOTH_L1:
        if beta < 1e-5:
            return a, _sign(z)
        if a < beta:
            return 0.5 * z * z / beta, z / beta
        return a - 0.5 * beta, _sign(z)
    # HUBER
    if a <= beta:
        return 0.5 * z * z, z
    return beta * (a - 0.5 * beta), beta * _sign(z)


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _coord_row(kind, p, t, w, scale, beta, loss, grad, i, want_grad):
    acc = 0.0
    wi = w[i] if w.shape[0] > 0 else 1.0
    for j in range(p.shape[1]):
        v, g = _coord(kind, p[i, j] - t[i, j], beta)
        acc += v
        if want_grad:
            grad[i, j] = g * wi * scale
    loss[i] = acc * wi


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def coord_kernel(kind, p, t, w, scale, beta, loss, grad, want_grad):
    n, d = p.shape
    for i in range(n):
        for j in range(d):
            if not math.isfinite(p[i, j]):
                return BAD_PRED
            if not math.isfinite(t[i, j]):
                return BAD_TARGET
    for i in range(n):
        _coord_row(kind, p, t, w, scale, beta, loss, grad, i, want_grad)
    return OK


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", parallel=True)
def coord_kernel_parallel(kind, p, t, w, scale, beta, loss, grad, want_grad):
    n, d = p.shape
    bad = 0
    for i in prange(n):
        ok = True
        for j in range(d):
            if not (math.isfinite(p[i, j]) and math.isfinite(t[i, j])):
                ok = False
        if ok:
            _coord_row(kind, p, t, w, scale, beta, loss, grad, i, want_grad)
        else:
            bad += 1
    return BAD_PRED if bad else OK


# ---------------------------------------------------------------------------------------------------------------
# IoU-family metrics (values only), elementwise and pairwise: the annotation tools' interactive calls

@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def box_metric(kind, x1, y1, x2, y2, X1, Y1, X2, Y2, eps, theta):
    """IoU, GIoU, DIoU, CIoU, EIoU or SIoU of two xyxy boxes, computed as the reference metrics compute them."""
    w1 = x2 - x1
    h1 = y2 - y1
    w2 = X2 - X1
    h2 = Y2 - Y1
    inter = max(min(x2, X2) - max(x1, X1), 0.0) * max(min(y2, Y2) - max(y1, Y1), 0.0)
    union = w1 * h1 + w2 * h2 - inter
    iou = inter / (union + eps)
    if kind == IOU:
        return iou
    cw = max(x2, X2) - min(x1, X1)
    ch = max(y2, Y2) - min(y1, Y1)
    if kind == GIOU:
        C = cw * ch
        return iou - (C - union) / (C + eps)
    dx = 0.5 * ((X1 + X2) - (x1 + x2))
    dy = 0.5 * ((Y1 + Y2) - (y1 + y2))
    if kind == SIOU:
        S = dx * dx + dy * dy
        angle = 2.0 * abs(dx) * abs(dy) / S if S > 0.0 else 0.0
        gamma = 2.0 - angle
        distance = (1.0 - math.exp(-gamma * (dx * dx / (cw * cw + eps)))) + \
            (1.0 - math.exp(-gamma * (dy * dy / (ch * ch + eps))))
        qw = 1.0 - math.exp(-abs(w1 - w2) / (max(w1, w2) + eps))
        qh = 1.0 - math.exp(-abs(h1 - h2) / (max(h1, h2) + eps))
        return iou - 0.5 * (distance + _pow_and_below(qw, theta)[0] + _pow_and_below(qh, theta)[0])
    penalty = (dx * dx + dy * dy) / (cw * cw + ch * ch + eps)
    if kind == DIOU:
        return iou - penalty
    if kind == EIOU:
        return iou - penalty - (w1 - w2) * (w1 - w2) / (cw * cw + eps) - (h1 - h2) * (h1 - h2) / (ch * ch + eps)
    v = aspect_v(w1, h1, w2, h2, eps)[0]  # CIOU
    return iou - penalty - ciou_alpha(iou, v, eps) * v


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy", inline="always")
def _boxes_status(b, fmt, bad_value, inverted):
    """OK, or the status of b's first bad row (a non-finite value, or an inverted box)."""
    for i in range(b.shape[0]):
        if not (b[i, 0] * 0.0 + b[i, 1] * 0.0 + b[i, 2] * 0.0 + b[i, 3] * 0.0) == 0.0:
            return bad_value
        if fmt == 0:
            if b[i, 2] < b[i, 0] or b[i, 3] < b[i, 1]:
                return inverted
        elif b[i, 2] < 0 or b[i, 3] < 0:
            return inverted
    return OK


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def metric_kernel(kind, fmt, a, b, eps, theta, pairwise, out):
    """out[i] = metric(a[i], b[i]), or out[i, j] = metric(a[i], b[j]) when pairwise; a status, as the loss
    kernels return (nothing is computed on bad input)."""
    s = _boxes_status(a, fmt, BAD_PRED, INVERTED_PRED)
    if s == OK:
        s = _boxes_status(b, fmt, BAD_TARGET, INVERTED_TARGET)
    if s != OK:
        return s
    for i in range(a.shape[0]):
        x1, y1, x2, y2 = _to_xyxy(a[i, 0], a[i, 1], a[i, 2], a[i, 3], fmt)
        if pairwise:
            for j in range(b.shape[0]):
                X1, Y1, X2, Y2 = _to_xyxy(b[j, 0], b[j, 1], b[j, 2], b[j, 3], fmt)
                out[i, j] = box_metric(kind, x1, y1, x2, y2, X1, Y1, X2, Y2, eps, theta)
        else:
            X1, Y1, X2, Y2 = _to_xyxy(b[i, 0], b[i, 1], b[i, 2], b[i, 3], fmt)
            out[i, 0] = box_metric(kind, x1, y1, x2, y2, X1, Y1, X2, Y2, eps, theta)
    return OK
