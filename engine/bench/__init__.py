"""The preference-prediction benchmark of the paper's section 3.1: datasets and protocol."""
