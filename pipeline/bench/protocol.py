"""The bench's fixed numbers: the untimed warm-up before every clock, and the notebook's protocol."""

# Untimed batches/steps before every clock starts: the first passes pay one-off kernel selection and
# allocator growth, which a whole-dataset run amortises and a short timing would not.
WARMUP_BATCHES = 8
WARMUP_STEPS = 2
# The notebook's protocol (frozen arm and fine-tuning loop alike).
NOTEBOOK_BATCH = 4
NOTEBOOK_EPOCHS = 25
NOTEBOOK_LR = 1e-3
NOTEBOOK_MOMENTUM = 0.9
NOTEBOOK_STEP_SIZE = 7
NOTEBOOK_GAMMA = 0.1
NOTEBOOK_GROUP = "notebook_views"
