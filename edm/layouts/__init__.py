"""A second embedded model (issue 14, in progress): digits at named positions on a 32x32 canvas.

Only the data, the model config and the training script exist so far; no checkpoint is shipped
and no ``model=`` config points here yet (see the issue notes).
"""
