"""Evaluation metrics shipped with mst_hf, as `evaluate` modules loadable offline by folder path."""

import os

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))
TOKEN_ACCURACY_PATH = os.path.join(METRICS_DIR, "token_accuracy")
