// The CUDA source itself, compiled by the host compiler for the emulator.
#include "cuda/multi_pool2d.cu"
