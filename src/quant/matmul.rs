//! Fused quantised matmul: forward `y = x·Wᵀ` and the frozen linear's input gradient `dx = dy·W`.
