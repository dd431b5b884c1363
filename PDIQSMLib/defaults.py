"""The documented defaults of a reconstruction, in one place that imports nothing heavy: the command
line (pipeline.Settings, cli), the solvers and the Slicer panel all read them from here, so the same
data give the same map in Slicer and on the command line."""

METHOD = "pdi"
METHODS = ("pdi", "pdi-vi1", "pdi-vi2", "medi", "tikhonov", "tkd")
LAMBDA_METHODS = ("medi", "tikhonov", "pdi-vi1")  # methods whose --lambda means something
WITHOUT_NOISE_MAP = ("tkd", "tikhonov")  # the methods that read no noise map (W): --noise-std, --noisy-regions
TKD_THRESHOLD = 0.2
TIKHONOV_LAMBDA = 5e-3  # the fixed value (simulator's best); the default is automatic (solvers.auto_lambda)
MEDI_LAMBDA = 1e-3  # likewise
# PDI-VI1's TV weight: 3x MEDI's. On the four realistic sigma-calibration brains (20000-20003) PDI-VI1 at 1e-3
# fitted the non-dipolar field into chi (demeaned NRMSE 69.2 % mean, PDI 60.5), at 3e-3 59.7; the shared ICH
# case gains as much at either (60.7 -> 54.6 / 54.1 % demeaned). benchmarks/results/vi_trace_cpu.md.
VI_LAMBDA = 3e-3  # PDI-VI1's TV weight with a magnitude's edge mask, or none (TV everywhere)
VI_LAMBDA_PDI_EDGES = 1e-2  # with its default edge mask from PDI's own map (no magnitude; pipeline.vi_volume)
REFLECTION_COUNTS = (1, 2, 4, 8)  # how many mirrored inputs PDI may average (inference.REFLECTIONS)
# PDI: the field and its point reflection, averaged (inference.REFLECTIONS). On the validation and calibration brains
# (10000-10002, 20000-20003) two passes beat one on 14 of 14 (0.5-1.1 point demeaned NRMSE), 8 passes gain 0.5 more
# for 4 times the time; measured before the choice, never on a benchmark brain.
PDI_REFLECTIONS = 2
VI_SAMPLES = 5  # K, with the Monte Carlo estimator (the default estimator is exact: K unused)
PANEL_VI_SAMPLES = 0  # the Slicer panel's K: 0 takes the expectation exactly (the default), K >= 1 draws K samples
VI_ITERATIONS = 100
PRECISIONS = ("auto", "bf16", "fp32")  # how the network runs (training, PDI-VI): network.use_bf16
MEDI_MAX_ITER = 200
DEVICE = "auto"
UNITS = "ppm"
B0_TESLA = 3.0
TE_SECONDS = 0.02
MEDI_EDGES = ("magnitude", "pdi")  # where MEDI's edge mask M comes from (pipeline.Settings.medi_edges)
# where PDI-VI1's TV edge mask M comes from: 'auto' is the magnitude when one is given, else PDI's own map
VI_EDGES = ("auto", "magnitude", "pdi")
# PDI-VI's data term: the whole residual (keep), or blind to the solid harmonics up to degree 2 (ignore;
# vi.BLIND_DEGREE; benchmarks/results/vi_harmonics.md)
VI_HARMONICS = ("keep", "ignore")
# where PDI-VI's fine-tuned map is kept: 'everywhere' (the paper's), 'discrepant': only deep in the brain where the
# field disagrees with PDI's map beyond a healthy brain's residue (weighting.discrepant_region; PDI's map elsewhere,
# no fine-tuning where nowhere), or 'gated': discrepant when PDI's residual is 0.78-1.2 times the field's cone noise
# level (weighting.residual_over_cone: PDI explains the field to its noise floor), else everywhere (a bleed, or a
# field out of PDI's training distribution). On healthy realistic simulated brains 'everywhere' fits the field's
# non-dipolar part into chi, 'discrepant' keeps only half of PDI-VI1's gain on bleeds, 'gated' keeps most of it and
# gains where the first, procedural-trained model gains (benchmarks/results/vi_where.md, vi_where_first.md; a weaker
# realistic-trained model gains more from 'everywhere' than its ratio says: vi_where_m10641.md). 'auto' (default):
# PDI-VI1 gated, PDI-VI2 discrepant (without TV its fine-tuning everywhere wrecks healthy simulated brains and loses
# on bleeds too; vi_where_vi2.md).
VI_WHERE = ("auto", "gated", "everywhere", "discrepant")
VI_WHERE_AUTO = {"pdi-vi1": "gated", "pdi-vi2": "discrepant"}
FIELD_TREND = ("keep", "remove")  # a linear trend fitted beside PDI's map taken off first (pipeline.without_trend)
FIELD_MEAN = ("remove", "keep")  # the field's mean in the mask removed before any method (weighting.without_mean)
NOISY_REGIONS = ("auto", "off")  # without a noise map: noise found in the field (weighting.noisy_regions), or none
