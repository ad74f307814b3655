// power/action_queue_test.cpp: (being written)
