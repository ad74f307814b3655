// power/simulated_driver_test.cpp: (being written)
