"""Every card: the paper's claim and figure, bnlab's experiment of it, and its pre-declared contrasts.

Figures quoted as the paper's are only those marked [verified] in the project's research notes (read
in the paper or its official code); a contrast carries `paper_effect` only where such a figure gives
its value. Smallest effects that count are in the metric's units (accuracy: 0.01 = one point).

Sizes: `quick` is sized to finish within 5 minutes through `make run`'s worker on a 2-core CPU (the
estimate is `estimate.estimated_seconds`); `full` is as large as is useful on such a machine; `test`
is the suite's wiring check (synthetic data, one epoch, two seeds).
"""

from __future__ import annotations

import copy
from typing import Any

from service.cards.model import TEST_LIMIT, TEST_SEEDS, Card, Contrast, FigureSpec, PaperFigure, Sizes
from service.experiments.presets import PRESETS
from service.experiments.report import Term

NORM = "model.norm.kind"
ACC = "final.val_accuracy"
FIVE = (0, 1, 2, 3, 4)
EIGHT = (0, 1, 2, 3, 4, 5, 6, 7)
TEN = tuple(range(10))


def wiring_sizes() -> Sizes:
    """The test scale: one epoch, two seeds, a few hundred samples."""
    return Sizes(epochs=1, seeds=TEST_SEEDS, limit=TEST_LIMIT)


def diff(
    name: str,
    sentence: str,
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    metric: str = ACC,
    direction: int = 1,
    smallest: float = 0.01,
    words: str,
    paper_effect: float | None = None,
    paper_effect_source: str = "",
) -> Contrast:
    """metric(a) − metric(b), claimed positive (direction 1) or negative (−1)."""
    return Contrast(
        name=name,
        sentence=sentence,
        metric=metric,
        terms=(Term(a, 1.0), Term(b, -1.0)),
        direction=1 if direction > 0 else -1,
        smallest=smallest,
        words=words,
        paper_effect=paper_effect,
        paper_effect_source=paper_effect_source,
    )


def less_drop(
    name: str,
    sentence: str,
    key: str,
    good: Any,
    bad: Any,
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    smallest: float = 0.01,
    words: str,
    paper_effect: float | None = None,
    paper_effect_source: str = "",
) -> Contrast:
    """(a@bad − a@good) − (b@bad − b@good) > 0: `a` loses less accuracy than `b` when `key` goes from
    `good` to `bad`."""
    return Contrast(
        name=name,
        sentence=sentence,
        metric=ACC,
        terms=(
            Term({**a, key: bad}, 1.0),
            Term({**a, key: good}, -1.0),
            Term({**b, key: bad}, -1.0),
            Term({**b, key: good}, 1.0),
        ),
        direction=1,
        smallest=smallest,
        words=words,
        paper_effect=paper_effect,
        paper_effect_source=paper_effect_source,
    )


# ---------------------------------------------------------------------------------- the papers

IOFFE_2015 = Card(
    name="ioffe-2015-fig1",
    needs="the activation-percentile probe (15/50/85th percentiles of each sigmoid's input per epoch)",
    title="Batch Normalization, Fig. 1: a 3 × 100 sigmoid MLP with and without BN",
    citation="Ioffe & Szegedy 2015, Batch Normalization: Accelerating Deep Network Training by Reducing "
    "Internal Covariate Shift, ICML; arXiv 1502.03167, §4.1 and Fig. 1",
    claim="BN trains faster and reaches a higher test accuracy, and the distribution of a sigmoid's input "
    "(its 15th, 50th and 85th percentiles) stays stable with BN while it drifts without (paraphrase).",
    paper_setup="MNIST; 3 fully connected hidden layers of 100 sigmoid units, small random Gaussian "
    "initialisation, BN before each nonlinearity, minibatches of 60, 50 000 steps; Fig. 1 plots test "
    "accuracy against steps and the percentiles of one last-hidden-layer sigmoid's input.",
    paper_figures=(
        PaperFigure("On ImageNet, BN reaches the same accuracy in 14× fewer training steps.", True),
        PaperFigure("The MNIST curves of Fig. 1 are read qualitatively: no number is quoted.", False),
    ),
    setup="The same 3 × 100 sigmoid MLP, BN before each sigmoid, plain SGD at lr 0.5, batch 60, on "
    "MNIST when installed, else Fashion-MNIST; a few thousand steps.",
    differences="Thousands of steps instead of 50 000; PyTorch's default uniform init instead of a small "
    "Gaussian; Fashion-MNIST is harder than MNIST, so accuracies are lower.",
    base={
        "model": {
            "hidden": [100, 100, 100],
            "activation": "sigmoid",
            "norm": {"position": "before_activation"},
        },
        "train": {"batch_size": 60, "optimizer": "sgd", "lr": 0.5, "momentum": 0.0},
    },
    parts=({NORM: ["none", "batch"]},),
    datasets=("mnist", "fashion-mnist"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=5, seeds=FIVE, limit=12_000),
        "full": Sizes(epochs=20, seeds=EIGHT, limit=None),
    },
    contrasts=(
        diff(
            "higher-accuracy",
            "With BN the network reaches a higher validation accuracy.",
            {NORM: "batch"},
            {NORM: "none"},
            words="batch − none",
        ),
        diff(
            "trains-faster",
            "With BN the network trains faster: a higher validation accuracy averaged over the epochs.",
            {NORM: "batch"},
            {NORM: "none"},
            metric="mean.val_accuracy",
            words="batch − none, mean over epochs",
        ),
        diff(
            "stable-inputs",
            "The spread of a sigmoid's input percentiles (85th − 15th) drifts less with BN than without.",
            {NORM: "none"},
            {NORM: "batch"},
            metric="probe.sigmoid_input_drift",
            smallest=0.1,
            words="drift none − drift batch",
        ),
    ),
    figure=FigureSpec(kind="curves", metric="val_accuracy", title="Validation accuracy (cf. Fig. 1a)"),
    target=0.8,
)

ARTICLE_SEED = Card(
    name="article-seed",
    title="The article's experiment: Dense(128) with and without BN, Keras semantics",
    citation="The seed article 'With and Without Batch Normalization' (bnlab's origin); Keras "
    "BatchNormalization defaults",
    claim="Adding a BatchNormalization layer after Dense(128, relu) lowers the validation loss and "
    "raises the accuracy (paraphrase of the article's conclusion).",
    paper_setup="MNIST, Flatten → Dense(128, relu) → [BatchNormalization] → Dense(10), Adam 1e-3, batch "
    "32, 10 epochs, validation_split 0.2.",
    paper_figures=(PaperFigure("The article shows loss curves only; no number is quoted.", False),),
    setup="Exactly that network, optimiser and split with Keras semantics (compat keras: Glorot init, "
    "eps 1e-3, momentum 0.99, Adam eps 1e-7); MNIST when installed, else Fashion-MNIST.",
    differences="Fashion-MNIST replaces MNIST when MNIST is not installed; PyTorch, not TensorFlow.",
    base={
        "compat": "keras",
        "model": {"hidden": [128], "activation": "relu", "norm": {"position": "after_activation"}},
        "train": {"batch_size": 32, "optimizer": "adam", "lr": 0.001},
    },
    parts=({NORM: ["none", "batch"]},),
    datasets=("mnist", "fashion-mnist"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=10, seeds=FIVE, limit=None),
        "full": Sizes(epochs=10, seeds=TEN, limit=None),
    },
    contrasts=(
        diff(
            "lower-val-loss",
            "BN lowers the final validation loss.",
            {NORM: "batch"},
            {NORM: "none"},
            metric="final.val_loss",
            direction=-1,
            smallest=0.01,
            words="batch − none (validation loss)",
        ),
        diff(
            "higher-val-accuracy",
            "BN raises the final validation accuracy.",
            {NORM: "batch"},
            {NORM: "none"},
            smallest=0.003,
            words="batch − none",
        ),
        diff(
            "lower-train-loss",
            "BN trains faster: a lower training loss after the same epochs.",
            {NORM: "batch"},
            {NORM: "none"},
            metric="final.train_loss",
            direction=-1,
            smallest=0.01,
            words="batch − none (training loss)",
        ),
    ),
    figure=FigureSpec(kind="curves", metric="val_loss", title="Validation loss, as the article plots it"),
)

ARTICLE_DEPTH = Card(
    name="article-depth",
    needs="the deep archs: model.arch resmlp, the depth × width mlp shorthand, model.init fixup / skipinit",
    title="Depth: plain MLPs of 10/30/100 layers with and without BN, against residual nets",
    citation="The seed article ('BN makes networks of 100+ layers trainable'); He et al. 2016 (ResNet); "
    "Zhang et al. 2019 (Fixup); De & Smith 2020 (SkipInit)",
    claim="BN makes very deep networks trainable; residual networks train at depth with BN, and without "
    "normalisation when initialised with Fixup or SkipInit (paraphrase).",
    paper_setup="ResNets of 20–110 layers on CIFAR-10 (6n + 2); the article states the claim without a "
    "figure.",
    paper_figures=(PaperFigure("Qualitative: no number is quoted.", False),),
    setup="ReLU MLPs of 10, 30 and 100 hidden layers of width 64 with and without BN, and residual MLPs "
    "(resmlp) of the same depths with BN, Fixup or SkipInit; SGD with momentum, Fashion-MNIST.",
    differences="MLPs on Fashion-MNIST instead of CNNs on CIFAR-10, and a few epochs at one learning rate: a "
    "100-layer plain MLP with BN has exploding gradients at initialisation (Yang et al. 2019), so at this "
    "rate both plain 100-layer nets can stay at chance, which makes 'BN alone trains depth 100' fail here.",
    base={
        "model": {"width": 64, "activation": "relu", "norm": {"position": "before_activation"}},
        "train": {"batch_size": 64, "optimizer": "sgd", "lr": 0.02, "momentum": 0.9},
    },
    parts=(
        {
            "model.arch": ["mlp"],
            "model.depth": [10, 30, 100],
            NORM: ["none", "batch"],
            "model.init": ["default"],
        },
        {"model.arch": ["resmlp"], "model.depth": [10, 30, 100], NORM: ["batch"], "model.init": ["default"]},
        {
            "model.arch": ["resmlp"],
            "model.depth": [10, 30, 100],
            NORM: ["none"],
            "model.init": ["fixup", "skipinit"],
        },
    ),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=2, seeds=(0, 1, 2), limit=4000),
        "full": Sizes(epochs=10, seeds=FIVE, limit=30_000),
    },
    contrasts=(
        diff(
            "bn-trains-depth-100",
            "At depth 100, a plain MLP with BN reaches a higher accuracy than without.",
            {"model.arch": "mlp", "model.depth": 100, NORM: "batch"},
            {"model.arch": "mlp", "model.depth": 100, NORM: "none"},
            smallest=0.05,
            words="mlp-100 batch − mlp-100 none",
        ),
        diff(
            "residual-beats-plain",
            "At depth 100, a residual MLP with BN beats the plain MLP with BN.",
            {"model.arch": "resmlp", "model.depth": 100, NORM: "batch"},
            {"model.arch": "mlp", "model.depth": 100, NORM: "batch"},
            smallest=0.01,
            words="resmlp-100 batch − mlp-100 batch",
        ),
        diff(
            "fixup-trains-depth-100",
            "At depth 100 without normalisation, a Fixup residual MLP beats the plain MLP.",
            {"model.arch": "resmlp", "model.depth": 100, "model.init": "fixup"},
            {"model.arch": "mlp", "model.depth": 100, NORM: "none"},
            smallest=0.05,
            words="resmlp-100 fixup − mlp-100 none",
        ),
        diff(
            "skipinit-trains-depth-100",
            "At depth 100 without normalisation, a SkipInit residual MLP beats the plain MLP.",
            {"model.arch": "resmlp", "model.depth": 100, "model.init": "skipinit"},
            {"model.arch": "mlp", "model.depth": 100, NORM: "none"},
            smallest=0.05,
            words="resmlp-100 skipinit − mlp-100 none",
        ),
    ),
    figure=FigureSpec(
        kind="versus",
        metric=ACC,
        x="model.depth",
        series="config",
        log_x=True,
        title="Accuracy against depth",
    ),
    target=0.7,
)

SANTURKAR_2018 = Card(
    name="santurkar-2018",
    needs="norm kind noisy_batch and the smoothness probes (loss and gradient change along the gradient)",
    title="How does BN help optimisation? BN vs noisy BN vs no BN",
    citation="Santurkar, Tsipras, Ilyas & Mądry 2018, How Does Batch Normalization Help Optimization?, "
    "NeurIPS; arXiv 1805.11604",
    claim="BN's benefit is not a reduction of internal covariate shift: 'noisy BN' (noise with a non-zero, "
    "changing mean and non-unit variance injected after BN) trains like BN, and BN makes the loss "
    "landscape smoother (paraphrase).",
    paper_setup="VGG on CIFAR-10 and a 25-layer deep linear network; noise after each BN layer; loss "
    "and gradient changes measured along the gradient direction.",
    paper_figures=(
        PaperFigure("Noisy BN trains about as well as BN despite a larger distributional shift.", True),
        PaperFigure("Smoothness curves of VGG / deep linear nets: read qualitatively.", False),
    ),
    setup="A 3 × 128 ReLU MLP, BN before the activation, SGD lr 0.1 with momentum, Fashion-MNIST; noisy "
    "BN from the norm kind noisy_batch; smoothness from the per-epoch smoothness probe; input shift from "
    "the covariate-shift probe (each norm slot's input mean and std on a fixed batch).",
    differences="An MLP instead of VGG, a few epochs; the shift is the change of each slot input's mean "
    "and std over training, not the paper's gradient-based ICS measure.",
    base={
        "model": {"hidden": [128, 128, 128], "activation": "relu", "norm": {"position": "before_activation"}},
        "train": {
            "batch_size": 64,
            "optimizer": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "probes": {"smoothness": True},
        },
    },
    parts=({NORM: ["none", "batch", "noisy_batch"]},),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=4, seeds=FIVE, limit=10_000),
        "full": Sizes(epochs=15, seeds=EIGHT, limit=None),
    },
    contrasts=(
        diff(
            "noisy-trains",
            "Noisy BN still trains far better than no normalisation.",
            {NORM: "noisy_batch"},
            {NORM: "none"},
            words="noisy_batch − none",
        ),
        diff(
            "noisy-shifts-more",
            "Noisy BN's layer inputs shift more over training than BN's.",
            {NORM: "noisy_batch"},
            {NORM: "batch"},
            metric="shift.slot_inputs",
            smallest=0.05,
            words="shift noisy_batch − shift batch",
        ),
        diff(
            "bn-smoother",
            "BN's loss landscape is smoother: a smaller gradient change along the gradient.",
            {NORM: "batch"},
            {NORM: "none"},
            metric="probe.gradient_predictiveness",
            direction=-1,
            smallest=0.05,
            words="batch − none (gradient change)",
        ),
    ),
    figure=FigureSpec(kind="curves", metric="train_loss", title="Training loss: BN, noisy BN, none"),
    target=0.8,
)

YANG_2019 = Card(
    name="yang-2019",
    needs="the per-layer gradient-norm probe at initialisation and the depth × width mlp shorthand",
    title="Mean-field BN: gradients explode with depth at initialisation",
    citation="Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019, A Mean Field Theory of Batch "
    "Normalization, ICLR; arXiv 1902.08129",
    claim="At initialisation, the gradients of deep BN networks without skip connections explode with "
    "depth; only moving towards the linear regime reduces it (paraphrase).",
    paper_setup="Fully connected BN networks of many depths at initialisation; trainability mapped over "
    "depth and learning rate.",
    paper_figures=(
        PaperFigure("The explosion itself is verified; its per-layer rate is not quoted.", False),
    ),
    setup="ReLU BN MLPs of width 128 and depth 8/16/32/64: the per-layer gradient norms at initialisation "
    "(the gradient-norm probe, epoch 0) fitted as log-norm against layer; and a depth × learning-rate "
    "grid for the rates at which they still train.",
    differences="Fashion-MNIST and a few epochs instead of the paper's synthetic sweeps.",
    base={
        "model": {"width": 128, "activation": "relu", "norm": {"position": "before_activation"}},
        "train": {"batch_size": 64, "optimizer": "sgd", "momentum": 0.0},
    },
    parts=({"model.depth": [8, 16, 32, 64], "train.lr": [0.01, 0.1, 1.0]},),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=2, seeds=(0, 1, 2), limit=4000),
        "full": Sizes(epochs=5, seeds=FIVE, limit=20_000),
    },
    contrasts=(
        Contrast(
            name="gradients-grow-towards-the-input",
            sentence="At initialisation, the depth-64 BN network's gradient norm grows layer by layer "
            "towards the input: the fitted slope of log-norm against layer is negative.",
            metric="probe.gradient_log_slope",
            terms=(Term({"model.depth": 64, "train.lr": 0.1}, 1.0),),
            direction=-1,
            smallest=0.05,
            words="slope of log ‖∂L/∂W_l‖ over l at depth 64, initialisation",
        ),
        Contrast(
            name="steeper-than-at-depth-8",
            sentence="The gradient growth per layer at initialisation is no artefact of depth: at depth 64 "
            "the slope is at least as steep as at depth 8 (more negative).",
            metric="probe.gradient_log_slope",
            terms=(
                Term({"model.depth": 64, "train.lr": 0.1}, 1.0),
                Term({"model.depth": 8, "train.lr": 0.1}, -1.0),
            ),
            direction=-1,
            smallest=0.01,
            words="slope at depth 64 − slope at depth 8",
        ),
        diff(
            "deep-needs-small-lr",
            "At lr 1.0 the depth-64 network trains worse than the depth-8 one.",
            {"model.depth": 64, "train.lr": 1.0},
            {"model.depth": 8, "train.lr": 1.0},
            direction=-1,
            smallest=0.05,
            words="depth 64 − depth 8 at lr 1.0",
        ),
    ),
    figure=FigureSpec(
        kind="versus",
        metric=ACC,
        x="train.lr",
        series="model.depth",
        log_x=True,
        title="Accuracy against lr, by depth",
    ),
    target=0.7,
)

WU_HE_2018 = Card(
    name="wu-he-2018",
    title="Group Normalization: BN degrades as the batch shrinks, GN stays flat",
    citation="Wu & He 2018, Group Normalization, ECCV; arXiv 1803.08494, Fig. 1 and Table 3",
    claim="'BN's error increases rapidly when the batch size becomes smaller'; GN's 'accuracy is stable "
    "in a wide range of batch sizes' (the abstract).",
    paper_setup="ResNet-50 on ImageNet, batch 32 down to 2 images per GPU, GN with 32 groups.",
    paper_figures=(
        PaperFigure("ResNet-50 ImageNet error: BN 23.6 % at batch 32 → 34.7 % at batch 2; GN 24.1 %.", True),
    ),
    setup="A small CNN (conv 16, 32 channels, 3 × 3, each Conv–Norm–ReLU), GN with 8 groups, Adam 1e-3, "
    "Fashion-MNIST, batch 32, 8 and 2.",
    differences="A 2-layer CNN and a few epochs on Fashion-MNIST instead of ResNet-50 on ImageNet; the "
    "learning rate is not scaled with the batch, and the epochs are fixed, so batch 2 takes 16× the steps of "
    "batch 32 on a subset of a few thousand samples: short runs favour the small batches for both norms, "
    "which the paper's long schedule does not.",
    base={
        "model": {"arch": "cnn", "channels": [16, 32], "activation": "relu", "norm": {"num_groups": 8}},
        "train": {"optimizer": "adam", "lr": 0.001},
    },
    parts=({NORM: ["batch", "group"], "train.batch_size": [2, 8, 32]},),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=2, seeds=(0, 1, 2), limit=1500),
        "full": Sizes(epochs=5, seeds=FIVE, limit=12_000),
    },
    contrasts=(
        diff(
            "gn-beats-bn-at-2",
            "At batch 2, GN reaches a higher validation accuracy than BN.",
            {NORM: "group", "train.batch_size": 2},
            {NORM: "batch", "train.batch_size": 2},
            words="group − batch at batch 2",
            paper_effect=0.106,
            paper_effect_source="ImageNet error BN 34.7 % vs GN 24.1 % at batch 2",
        ),
        less_drop(
            "bn-drops-more",
            "Going from batch 32 to batch 2 costs BN more accuracy than GN.",
            "train.batch_size",
            32,
            2,
            {NORM: "group"},
            {NORM: "batch"},
            words="(group drop) − (batch drop), batch 32 → 2",
        ),
    ),
    figure=FigureSpec(
        kind="versus",
        metric=ACC,
        x="train.batch_size",
        series=NORM,
        error=True,
        log_x=True,
        title="Validation error against batch size (cf. GN Fig. 1)",
    ),
    target=0.75,
)

IOFFE_2017 = Card(
    name="ioffe-2017",
    needs="the training switch train.batch_order (class_sorted batches)",
    title="Batch Renormalization with small and with non-i.i.d. batches",
    citation="Ioffe 2017, Batch Renormalization: Towards Reducing Minibatch Dependence in "
    "Batch-Normalized Models, NeurIPS; arXiv 1702.03275",
    claim="BN's 'effectiveness diminishes when the training minibatches are small, or do not consist of "
    "independent samples'; Batch Renormalization fixes both.",
    paper_setup="Inception-v3 on ImageNet; batches of 4 images, and batches drawn from few classes; rmax "
    "ramps 1 → 3 by 40k steps, dmax 0 → 5 by 25k.",
    paper_figures=(
        PaperFigure("rmax ramps 1 → 3 by 40k steps and dmax 0 → 5 by 25k (the schedule).", True),
        PaperFigure("Accuracies at batch 4 are not verified: direction only.", False),
    ),
    setup="A 2 × 128 ReLU MLP, BN or BRN before the activation, SGD with momentum, Fashion-MNIST: batch 4 "
    "and batch 32 with shuffled data, and batch 32 drawn class-sorted (non-i.i.d.). The renorm schedule "
    "is shortened to the run's few thousand steps.",
    differences="An MLP and thousands of steps instead of Inception-v3 and 100k+ steps; the schedule is "
    "compressed (warm-up 200 steps, rmax by 1500, dmax by 1000).",
    base={
        "model": {
            "hidden": [128, 128],
            "activation": "relu",
            "norm": {
                "position": "before_activation",
                "renorm_warmup_steps": 200,
                "renorm_rmax_steps": 1500,
                "renorm_dmax_steps": 1000,
            },
        },
        "train": {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9},
    },
    parts=(
        {NORM: ["batch", "batch_renorm"], "train.batch_size": [4, 32], "train.batch_order": ["shuffled"]},
        {NORM: ["batch", "batch_renorm"], "train.batch_size": [32], "train.batch_order": ["class_sorted"]},
    ),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=3, seeds=FIVE, limit=5000),
        "full": Sizes(epochs=10, seeds=EIGHT, limit=30_000),
    },
    contrasts=(
        diff(
            "brn-small-batch",
            "At batch 4, Batch Renorm reaches a higher validation accuracy than BN.",
            {NORM: "batch_renorm", "train.batch_size": 4},
            {NORM: "batch", "train.batch_size": 4},
            smallest=0.005,
            words="batch_renorm − batch at batch 4",
        ),
        diff(
            "brn-non-iid",
            "With class-sorted batches, Batch Renorm reaches a higher validation accuracy than BN.",
            {NORM: "batch_renorm", "train.batch_order": "class_sorted"},
            {NORM: "batch", "train.batch_order": "class_sorted"},
            smallest=0.02,
            words="batch_renorm − batch, class-sorted batches",
        ),
    ),
    figure=FigureSpec(
        kind="versus",
        metric=ACC,
        x="train.batch_size",
        series="config",
        log_x=True,
        title="Accuracy by batch",
    ),
)

COOIJMANS_2016 = Card(
    name="cooijmans-2016",
    needs="the recurrent archs: model.arch rnn (an LSTM) with recurrent BN / LN in the cell",
    title="Recurrent BN: an LSTM on sequential Fashion-MNIST with BN, LN or none",
    citation="Cooijmans, Ballas, Laurent, Gülçehre & Courville 2016, Recurrent Batch Normalization, ICLR "
    "2017; arXiv 1603.09025",
    claim="Batch-normalizing the LSTM's input-to-hidden and hidden-to-hidden transformations (per-time-step "
    "statistics, γ initialised to 0.1) leads to faster convergence (paraphrase).",
    paper_setup="LSTM on sequential and permuted MNIST (784 steps), Penn Treebank, text8, CNN QA.",
    paper_figures=(
        PaperFigure("Recurrent BN: per-time-step statistics, γ initialised to 0.1.", True),
        PaperFigure("Sequential-MNIST accuracies are not verified: direction only.", False),
    ),
    setup="An LSTM of 64 units reading Fashion-MNIST row by row (28 steps of 28 pixels), recurrent BN "
    "(statistics per time step, γ = 0.1, momentum 0.1) vs layer norm vs none in the cell, Adam 1e-3, "
    "batch 64; the classifier reads the last step's hidden state.",
    differences="28 steps of rows instead of 784 pixels; Fashion-MNIST; a few epochs; PyTorch's LSTM init "
    "(every weight and bias uniform in ±1/√H) rather than the paper's own initialisation.",
    base={
        "model": {"arch": "rnn", "cell": "lstm", "hidden_size": 64, "norm": {"momentum": 0.1}},
        "train": {"batch_size": 64, "optimizer": "adam", "lr": 0.001},
    },
    parts=({NORM: ["none", "batch", "layer"]},),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        # 15 runs ≈ 200 s by the cost model on 2 training processes (docs/replications.md).
        "quick": Sizes(epochs=3, seeds=FIVE, limit=6000),
        "full": Sizes(epochs=10, seeds=FIVE, limit=None),
    },
    contrasts=(
        diff(
            "bn-converges-faster",
            "Recurrent BN trains faster: a higher validation accuracy averaged over the epochs than none.",
            {NORM: "batch"},
            {NORM: "none"},
            metric="mean.val_accuracy",
            words="batch − none, mean over epochs",
        ),
        diff(
            "bn-vs-ln",
            "Recurrent BN reaches a higher final validation accuracy than layer norm.",
            {NORM: "batch"},
            {NORM: "layer"},
            smallest=0.005,
            words="batch − layer",
        ),
    ),
    figure=FigureSpec(kind="curves", metric="val_accuracy", title="Validation accuracy per epoch"),
)

FRANKLE_2021 = Card(
    name="frankle-2021",
    needs="the training switch train.trainable (norm_only, random_subset)",
    title="Training BatchNorm and only BatchNorm",
    citation="Frankle, Schwab & Morcos 2021, Training BatchNorm and Only BatchNorm: On the Expressive "
    "Power of Random Features in CNNs, ICLR; arXiv 2003.00152",
    claim="Training only BN's γ and β, with every other weight frozen at its random init, reaches far "
    "above chance, and above training the same number of randomly chosen parameters (paraphrase).",
    paper_setup="ResNets and wide ResNets on CIFAR-10 and ImageNet, all other weights at init.",
    paper_figures=(
        PaperFigure("82 % on CIFAR-10 and 32 % ImageNet top-5 training only γ and β.", True),
        PaperFigure("About a third of the features are switched off (γ ≈ 0).", True),
    ),
    setup="A CNN (conv 32, 64) with BN, Adam 1e-2: all parameters, norm_only (γ, β) and random_subset "
    "(as many random parameters) trainable, Fashion-MNIST.",
    differences="A 2-layer CNN on Fashion-MNIST: it has far fewer γ, β than a deep ResNet, so its "
    "norm-only accuracy says less about random features' expressive power.",
    base={
        "model": {"arch": "cnn", "channels": [32, 64], "activation": "relu"},
        "train": {"batch_size": 64, "optimizer": "adam", "lr": 0.01},
    },
    parts=({NORM: ["batch"], "train.trainable": ["all", "norm_only", "random_subset"]},),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=2, seeds=(0, 1, 2), limit=3000),
        "full": Sizes(epochs=5, seeds=FIVE, limit=None),
    },
    contrasts=(
        diff(
            "norm-only-beats-random",
            "Training only γ and β beats training as many random parameters.",
            {"train.trainable": "norm_only"},
            {"train.trainable": "random_subset"},
            smallest=0.05,
            words="norm_only − random_subset",
        ),
        diff(
            "all-beats-norm-only",
            "Training everything beats training γ and β alone.",
            {"train.trainable": "all"},
            {"train.trainable": "norm_only"},
            smallest=0.01,
            words="all − norm_only",
        ),
    ),
    figure=FigureSpec(
        kind="versus", metric=ACC, x="train.trainable", series=NORM, title="Accuracy by trainable set"
    ),
)

BROCK_2021 = Card(
    name="brock-2021",
    needs="model.arch resnet, norm kind ws and the training switch train.agc",
    title="Normalizer-free residual nets with AGC vs their BN version across batch sizes",
    citation="Brock, De & Smith 2021, Characterizing signal propagation to close the performance gap in "
    "unnormalized ResNets (ICLR); Brock, De, Smith & Simonyan 2021, High-Performance Large-Scale Image "
    "Recognition Without Normalization (ICML), arXiv 2102.06171",
    claim="Normalizer-free ResNets with scaled weight standardization and adaptive gradient clipping "
    "(each unit's ‖G‖/‖W‖ clipped at λ) match batch-normalized ones (paraphrase).",
    paper_setup="NF-ResNets / NFNets on ImageNet, batch sizes up to 4096.",
    paper_figures=(
        PaperFigure("NFNet-F1 matches EfficientNet-B7 and is 8.7× faster to train; 86.5 % top-1.", True),
    ),
    setup="A CIFAR-style ResNet-8 (width 8) on Fashion-MNIST: BN vs scaled weight standardization (ws) "
    "with AGC at λ 0.01, batch 16 and 128, SGD with momentum.",
    differences="A tiny ResNet on Fashion-MNIST for a few epochs, not NFNets on ImageNet.",
    base={
        "model": {"arch": "resnet", "depth": 8, "width": 8},
        "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    },
    parts=(
        {NORM: ["batch"], "train.batch_size": [16, 128], "train.agc": [None]},
        {NORM: ["ws"], "train.batch_size": [16, 128], "train.agc": [0.01]},
    ),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=2, seeds=(0, 1, 2), limit=2000),
        "full": Sizes(epochs=5, seeds=FIVE, limit=20_000),
    },
    contrasts=(
        diff(
            "nf-at-small-batch",
            "At batch 16, the normalizer-free net with AGC reaches at least BN's accuracy (it beats it).",
            {NORM: "ws", "train.batch_size": 16},
            {NORM: "batch", "train.batch_size": 16},
            smallest=0.005,
            words="ws+agc − batch at batch 16",
        ),
        less_drop(
            "nf-flatter",
            "Going from batch 128 to 16 costs the normalizer-free net less accuracy than BN.",
            "train.batch_size",
            128,
            16,
            {NORM: "ws"},
            {NORM: "batch"},
            smallest=0.005,
            words="(ws drop) − (batch drop), batch 128 → 16",
        ),
    ),
    figure=FigureSpec(
        kind="versus",
        metric=ACC,
        x="train.batch_size",
        series=NORM,
        log_x=True,
        title="Accuracy against batch",
    ),
    target=0.7,
)

ZIAEE_2022 = Card(
    name="ziaee-2022",
    title="Batch Layer Normalization vs BN vs LN at small and moderate batches",
    citation="Ziaee & Çano 2022, Batch Layer Normalization: A new normalization layer for CNNs and RNNs; "
    "arXiv 2209.08898, and the authors' code (A2Amir, helpers/bln_layer.py)",
    claim="BLN, mixing batch and layer normalization by the inverse batch size, performs better than BN "
    "and LN at small and at larger batches (paraphrase).",
    paper_setup="A CNN on CIFAR-10 and an RNN on IMDB at batch sizes 1 and 25.",
    paper_figures=(
        PaperFigure("y = γ[(1/B)·x_LN + (1 − 1/B)·x_BN]/√d + β (the reference code).", True),
        PaperFigure("Batch sizes 1 and 25 in the paper's experiments.", True),
    ),
    setup="A 1 × 128 ReLU MLP on Fashion-MNIST, BN vs BLN vs LN, Adam 1e-3, batch 2 and 25.",
    differences="Batch 2 instead of 1: bnlab refuses to train batch-statistics norms on a batch of one "
    "(BN's output would be β); an MLP on Fashion-MNIST instead of a CNN on CIFAR-10 / an RNN on IMDB.",
    base={
        "model": {"hidden": [128], "activation": "relu", "norm": {"position": "before_activation"}},
        "train": {"optimizer": "adam", "lr": 0.001},
    },
    parts=({NORM: ["batch", "batch_layer", "layer"], "train.batch_size": [2, 25]},),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=2, seeds=FIVE, limit=4000),
        "full": Sizes(epochs=5, seeds=EIGHT, limit=30_000),
    },
    contrasts=(
        diff(
            "bln-beats-bn-at-2",
            "At batch 2, BLN reaches a higher validation accuracy than BN.",
            {NORM: "batch_layer", "train.batch_size": 2},
            {NORM: "batch", "train.batch_size": 2},
            smallest=0.005,
            words="batch_layer − batch at batch 2",
        ),
        diff(
            "bln-beats-ln-at-2",
            "At batch 2, BLN reaches a higher validation accuracy than LN.",
            {NORM: "batch_layer", "train.batch_size": 2},
            {NORM: "layer", "train.batch_size": 2},
            smallest=0.005,
            words="batch_layer − layer at batch 2",
        ),
        diff(
            "bln-beats-bn-at-25",
            "At batch 25, BLN reaches a higher validation accuracy than BN.",
            {NORM: "batch_layer", "train.batch_size": 25},
            {NORM: "batch", "train.batch_size": 25},
            smallest=0.005,
            words="batch_layer − batch at batch 25",
        ),
    ),
    figure=FigureSpec(
        kind="versus",
        metric=ACC,
        x="train.batch_size",
        series=NORM,
        log_x=True,
        title="Accuracy against batch",
    ),
)

SUMMERS_2020 = Card(
    name="summers-2020",
    needs="inference example weighing (model.norm.example_weight)",
    title="Ghost batch size and inference example weighing",
    citation="Summers & Dinneen 2020, Four Things Everyone Should Know to Improve Batch Normalization, "
    "ICLR; arXiv 1906.03548",
    claim="Ghost batch normalization with a small ghost batch helps even at moderate batch sizes, and "
    "weighing the example's own statistics into BN's at inference helps at small batches (paraphrase).",
    paper_setup="ResNets on CIFAR-100, Flowers, Caltech-256 and others; ghost sizes and the weight α swept.",
    paper_figures=(PaperFigure("No single headline number.", False),),
    setup="A 2 × 128 ReLU MLP on Fashion-MNIST, Adam 1e-3: BN at batch 4 and 128 with example weight 0 "
    "and 0.2 at eval, and ghost BN of 16 at batch 128.",
    differences="An MLP on Fashion-MNIST; one α instead of a sweep.",
    base={
        "model": {"hidden": [128, 128], "activation": "relu", "norm": {"position": "before_activation"}},
        "train": {"optimizer": "adam", "lr": 0.001},
    },
    parts=(
        {NORM: ["batch"], "train.batch_size": [4, 128], "model.norm.example_weight": [0.0, 0.2]},
        {NORM: ["ghost"], "train.batch_size": [128], "model.norm.virtual_batch_size": [16]},
    ),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=3, seeds=FIVE, limit=6000),
        "full": Sizes(epochs=10, seeds=EIGHT, limit=None),
    },
    contrasts=(
        diff(
            "ghost-helps",
            "At batch 128, ghost BN of 16 reaches a higher validation accuracy than BN.",
            {NORM: "ghost", "train.batch_size": 128},
            {NORM: "batch", "train.batch_size": 128, "model.norm.example_weight": 0.0},
            smallest=0.003,
            words="ghost(16) − batch at batch 128",
        ),
        diff(
            "example-weighing-helps",
            "At batch 4, weighing the example in at eval (α 0.2) raises the validation accuracy.",
            {NORM: "batch", "train.batch_size": 4, "model.norm.example_weight": 0.2},
            {NORM: "batch", "train.batch_size": 4, "model.norm.example_weight": 0.0},
            smallest=0.002,
            words="α 0.2 − α 0 at batch 4",
        ),
    ),
    figure=FigureSpec(
        kind="versus",
        metric=ACC,
        x="train.batch_size",
        series="config",
        log_x=True,
        title="Accuracy by batch",
    ),
)

WU_JOHNSON_2021 = Card(
    name="wu-johnson-2021",
    needs="the EMA-vs-exact statistics probe and the training switch train.frozen_bn_epochs",
    title="Rethinking 'batch' in BatchNorm: EMA statistics, PreciseBN and FrozenBN",
    citation="Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm; arXiv 2105.07576",
    claim="EMA running statistics can be poor estimates of the population's (large batch, short "
    "training); PreciseBN fixes it, and training the last epochs with frozen statistics (FrozenBN) "
    "closes the train/test inconsistency (paraphrase).",
    paper_setup="ResNet-50 on ImageNet and detection models; EMA vs precise statistics through training.",
    paper_figures=(PaperFigure("The claims are verified from a summary; no number is quoted.", True),),
    setup="A 2 × 128 ReLU MLP at batch 512, 3 epochs, Adam 1e-3, BN momentum 0.01: the EMA-vs-exact "
    "statistics gap (probe) and FrozenBN for the last epoch.",
    differences="An MLP on Fashion-MNIST; the gap is measured, not plotted over a full schedule.",
    base={
        "model": {"hidden": [128, 128], "activation": "relu", "norm": {"position": "before_activation"}},
        "train": {"batch_size": 512, "optimizer": "adam", "lr": 0.001, "probes": {"statistics_gap": True}},
    },
    parts=({NORM: ["batch"], "train.frozen_bn_epochs": [0, 1]},),
    datasets=("fashion-mnist", "synthetic"),
    sizes={
        "test": wiring_sizes(),
        "quick": Sizes(epochs=3, seeds=FIVE, limit=20_000),
        "full": Sizes(epochs=6, seeds=EIGHT, limit=None),
    },
    contrasts=(
        Contrast(
            name="ema-gap",
            sentence="With large batches and short training, the EMA statistics differ from the exact "
            "population statistics.",
            metric="probe.ema_gap",
            terms=(Term({"train.frozen_bn_epochs": 0}, 1.0),),
            direction=1,
            smallest=0.01,
            words="EMA − exact statistics gap (no FrozenBN)",
        ),
        diff(
            "frozen-bn-helps",
            "Freezing BN's statistics for the last epoch raises the validation accuracy.",
            {"train.frozen_bn_epochs": 1},
            {"train.frozen_bn_epochs": 0},
            smallest=0.002,
            words="frozen 1 − frozen 0",
        ),
    ),
    figure=FigureSpec(
        kind="curves", metric="val_accuracy", title="Validation accuracy with and without FrozenBN"
    ),
)


# ---------------------------------------------------------------------------------- the presets


def _from_preset(name: str, **fields: Any) -> Card:
    """A preset of /api/v1/presets as a card: its network, grid and sizes, judged by the new statistics."""
    preset = PRESETS[name]
    base = copy.deepcopy(preset.spec["base"])
    limit = base.pop("dataset", {}).get("limit")
    epochs = base["train"].pop("epochs")
    seeds = fields.pop("quick_seeds", FIVE)
    configs = 1
    for values in preset.spec["grid"].values():
        configs *= len(values)
    return Card(
        name=name,
        base=base,
        parts=(dict(preset.spec["grid"]),),
        datasets=preset.datasets,
        sizes={
            "test": wiring_sizes(),
            "quick": Sizes(epochs=epochs, seeds=seeds, limit=limit),
            "full": Sizes(
                epochs=epochs * 2,
                seeds=TEN[: min(10, 64 // configs)],
                limit=None if limit is None else min(4 * limit, 60_000),
            ),
        },
        target=preset.spec.get("target", 0.85),
        **fields,
    )


HIGHER_LR = _from_preset(
    "higher-lr",
    title="BN tolerates higher learning rates",
    citation="Ioffe & Szegedy 2015, §3.3 ('Batch Normalization enables higher learning rates')",
    claim="BN 'allows us to use much higher learning rates and be less careful about initialization'.",
    paper_setup="Inception on ImageNet with the learning rate raised 5× and 30×.",
    paper_figures=(PaperFigure("The ImageNet speed-ups are not verified here: direction only.", False),),
    setup="A 2 × 128 ReLU MLP, BN before the activation, SGD with momentum 0.9 at lr 0.01 and 0.3, batch 32.",
    differences="An MLP on Fashion-MNIST for 4 epochs; two learning rates.",
    contrasts=(
        diff(
            "bn-at-high-lr",
            "At lr 0.3, BN reaches a higher validation accuracy than no normalisation.",
            {NORM: "batch", "train.lr": 0.3},
            {NORM: "none", "train.lr": 0.3},
            words="batch − none at lr 0.3",
        ),
        less_drop(
            "bn-loses-less",
            "Raising the lr from 0.01 to 0.3 costs BN less validation accuracy than no normalisation.",
            "train.lr",
            0.01,
            0.3,
            {NORM: "batch"},
            {NORM: "none"},
            words="(batch drop) − (none drop), lr 0.01 → 0.3",
        ),
    ),
    figure=FigureSpec(
        kind="versus", metric=ACC, x="train.lr", series=NORM, log_x=True, title="Accuracy against lr"
    ),
)

SMALL_BATCH = _from_preset(
    "small-batch",
    title="Small batches: BN vs GroupNorm vs LayerNorm",
    citation="Wu & He 2018, Group Normalization; Ba, Kiros & Hinton 2016, Layer Normalization",
    claim="BN degrades at batches of 2–4, while GroupNorm and LayerNorm, whose statistics are per sample, "
    "do not (paraphrase).",
    paper_setup="ResNet-50 on ImageNet at batch 32 down to 2 (GN paper).",
    paper_figures=(
        PaperFigure("ResNet-50 ImageNet error: BN 23.6 % at batch 32 → 34.7 % at batch 2; GN 24.1 %.", True),
    ),
    setup="A 1 × 128 ReLU MLP, GN of 16 groups, Adam 1e-3, batch 2, 4 and 64, 3 000 samples.",
    differences="An MLP on 3 000 Fashion-MNIST samples for 3 epochs: with the epochs fixed, batch 2 takes "
    "32× the steps of batch 64, which favours the small batches for every norm.",
    contrasts=tuple(
        diff(
            f"{kind}-beats-bn-at-{batch}",
            f"At batch {batch}, {label} reaches a higher validation accuracy than BN.",
            {NORM: kind, "train.batch_size": batch},
            {NORM: "batch", "train.batch_size": batch},
            smallest=0.005,
            words=f"{kind} − batch at batch {batch}",
        )
        for batch in (2, 4)
        for kind, label in (("group", "GroupNorm"), ("layer", "LayerNorm"))
    )
    + (
        less_drop(
            "gn-drops-less",
            "Going from batch 64 to 2 costs GroupNorm less validation accuracy than BN.",
            "train.batch_size",
            64,
            2,
            {NORM: "group"},
            {NORM: "batch"},
            smallest=0.005,
            words="(group drop) − (batch drop), batch 64 → 2",
        ),
    ),
    figure=FigureSpec(
        kind="versus",
        metric=ACC,
        x="train.batch_size",
        series=NORM,
        error=True,
        log_x=True,
        title="Validation error against batch size",
    ),
    quick_seeds=(0, 1, 2, 3),
)

DEEP_SIGMOID = _from_preset(
    "deep-sigmoid",
    title="BN rescues a deep sigmoid MLP",
    citation="Ioffe & Szegedy 2015, §4.1",
    claim="With BN before each sigmoid, the 3 × 100 network trains faster and reaches a higher accuracy "
    "(paraphrase).",
    paper_setup="MNIST, 3 × 100 sigmoid units, batch 60, 50 000 steps.",
    paper_figures=(PaperFigure("The MNIST curves are read qualitatively: no number is quoted.", False),),
    setup="The 3 × 100 sigmoid MLP, plain SGD at lr 0.5, batch 60, 12 000 samples, 5 epochs.",
    differences="About 1 000 steps instead of 50 000; Fashion-MNIST when MNIST is absent.",
    contrasts=(
        diff(
            "higher-final",
            "With BN before each sigmoid, the final validation accuracy is higher.",
            {NORM: "batch"},
            {NORM: "none"},
            words="batch − none",
        ),
        diff(
            "higher-best",
            "With BN, the best validation accuracy over the epochs is higher.",
            {NORM: "batch"},
            {NORM: "none"},
            metric="best.val_accuracy",
            words="batch − none (best epoch)",
        ),
    ),
    figure=FigureSpec(kind="curves", metric="val_accuracy", title="Validation accuracy per epoch"),
)

INIT_SCALE = _from_preset(
    "init-scale",
    title="BN makes training insensitive to the initial weights' scale",
    citation="Ioffe & Szegedy 2015, §3.3 (BN((aW)u) = BN(Wu))",
    claim="'Batch Normalization allows us to use much higher learning rates and be less careful about "
    "initialization'; BN's output does not change with the scale of the weights.",
    paper_setup="The identity BN((aW)u) = BN(Wu) and its Jacobian; no experiment of its own.",
    paper_figures=(PaperFigure("An identity, not a measurement: no number is quoted.", False),),
    setup="A 2 × 128 ReLU MLP, SGD with momentum, initial weights scaled by 0.1, 1 and 5.",
    differences="The paper argues it analytically; here it is measured after 5 epochs.",
    contrasts=tuple(
        less_drop(
            f"bn-loses-less-at-{scale:g}",
            f"Scaling the initial weights by {scale:g} instead of 1 costs BN less accuracy than none.",
            "model.init_scale",
            1.0,
            scale,
            {NORM: "batch"},
            {NORM: "none"},
            words=f"(batch drop) − (none drop), scale 1 → {scale:g}",
        )
        for scale in (0.1, 5.0)
    ),
    figure=FigureSpec(
        kind="versus",
        metric=ACC,
        x="model.init_scale",
        series=NORM,
        log_x=True,
        title="Accuracy against init scale",
    ),
)

CARDS: dict[str, Card] = {
    card.name: card
    for card in (
        IOFFE_2015,
        ARTICLE_SEED,
        ARTICLE_DEPTH,
        SANTURKAR_2018,
        YANG_2019,
        WU_HE_2018,
        IOFFE_2017,
        COOIJMANS_2016,
        FRANKLE_2021,
        BROCK_2021,
        ZIAEE_2022,
        SUMMERS_2020,
        WU_JOHNSON_2021,
        HIGHER_LR,
        SMALL_BATCH,
        DEEP_SIGMOID,
        INIT_SCALE,
    )
}
