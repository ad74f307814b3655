// power/libvirt_driver.cpp: (being written)
