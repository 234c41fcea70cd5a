import warnings

# rotary_embedding_torch (imported by the reference implementation) warns at import time.
warnings.filterwarnings("ignore", category=FutureWarning, module="rotary_embedding_torch")
