// The emulated CUDA runtime (cuda_runtime.h): the launchers' headers include this one.
#pragma once

#include "cuda_runtime.h"
