// Emulated CUDA header (see ../emulator.h).
#pragma once
#include "../emulator.h"
