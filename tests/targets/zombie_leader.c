/* A process whose main thread has exited while another thread runs on: main starts a thread, prints
   "ready" once it runs, and calls pthread_exit; the thread calls work() until stdin is closed. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { return x * 3 + 3; }

static void *thread(void *arg) {
    (void)arg;
    char c;
    printf("ready\n");
    fflush(stdout);
    while (read(0, &c, 1) > 0) work(c);
    return NULL;
}

int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, thread, NULL);
    pthread_exit(NULL);
}
