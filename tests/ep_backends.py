"""The EP backends that the backend-parametrized tests run against."""

EP_BACKENDS = ["torch", "triton"]
