import os
import sys

import torch

# Tests import the top-level modules (model.py, attention.py, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tiny models: one thread is faster and leaves a core for DDP tests
