// power/action_queue.cpp: (being written)
