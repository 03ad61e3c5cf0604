"""Root test configuration.

torch and torchvision are imported before anything else: importing TensorFlow first and torchvision
afterwards in one process segfaults here (a triton symbol clash), while this order is safe. Tests that
write TFRecord fixtures import TensorFlow later, inside the test session.
"""

import torch  # noqa: F401  (must come first, see above)
import torchvision  # noqa: F401
