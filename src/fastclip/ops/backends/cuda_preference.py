"""Which of the GPU backends ``auto`` tries first (refined by issue 7)."""


def auto_order(order: list[str]) -> list[str]:
    return order
