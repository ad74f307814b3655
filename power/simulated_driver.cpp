// power/simulated_driver.cpp: (being written)
