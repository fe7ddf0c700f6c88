// Emulation stand-in for the CUDA header of the same name (see ../cuda_emulation.h).
#include "../cuda_emulation.h"
