"""Training building blocks shared by the train, reduce_t and qat stages."""
