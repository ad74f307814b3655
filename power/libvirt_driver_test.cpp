// power/libvirt_driver_test.cpp: (being written)
