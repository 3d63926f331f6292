// The CUDA source itself, compiled by the host compiler for the emulator.
#include "cuda/upsample_shift_add.cu"
