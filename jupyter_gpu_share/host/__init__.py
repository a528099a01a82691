"""Host agent: NVML inventory, kernel launcher and the outbound broker connection."""
