// The AMX `quad` loop of src/quant/matmul_bf16/amx.rs in C, on one core, over operand layouts and
// pair chunkings: what session 25 measured before chunking the forward's sweeps (amx.rs,
// CHUNK_PAIRS). Not part of the build; single runs on a shared VM vary by 10-20 %, so read it
// beside the step's alternating runs (docs/BENCHMARKS.md), not alone.
//
//   gcc -O2 -mamx-tile -mamx-bf16 -mavx512f -o /tmp/amx_quad benches/amx/quad.c
//   /tmp/amx_quad K ROWS COLS      # e.g. 768 128 64: a ~100M forward sweep (W tile x one x block)
//
// Prints GFLOP/s for: row-major a (as the kernels read W's tile), a packed tile by tile, each in
// row-block or column-block order, and the row-major loop with its pairs in chunks of 64..1024.
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
typedef struct { uint8_t palette, start; uint8_t res[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((aligned(64))) cfg_t;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
// One 32 x 32 block of out over all pairs: 2 x 2 accumulators, two a and two b tiles a round.
static void block(const char*a, long sa, long a_tile_rstep, long a_tile_pstep, const char*b, long sb, float*out, long so, int r, int c, int pairs){
  _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
  for(int p=0;p<pairs;p+=16){
    const char*a0=a+(r/16)*a_tile_rstep+(p/16)*a_tile_pstep; const char*a1=a0+a_tile_rstep;
    const char*b0=b+(long)p*sb+c*4;
    _tile_loadd(4,a0,sa); _tile_loadd(6,b0,sb); _tile_dpbf16ps(0,4,6);
    _tile_loadd(7,b0+64,sb); _tile_dpbf16ps(1,4,7);
    _tile_loadd(5,a1,sa); _tile_dpbf16ps(2,5,6); _tile_dpbf16ps(3,5,7);
  }
  float*o=out+(long)r*so/4+c;
  _tile_stored(0,o,so);_tile_stored(1,o+16,so);_tile_stored(2,o+16*so/4,so);_tile_stored(3,o+16*so/4+16,so);
}
// a: rows x pairs (u32) at stride sa (bytes), tile (r,p) address given by the steps; b: pairs x cols
// u32 at stride sb; out rows x cols f32 at stride so; order 0: row blocks outer, 1: column blocks.
static void quad(const char*a, long sa, long a_tile_rstep, long a_tile_pstep, const char*b, long sb, float*out, long so, int rows, int cols, int pairs, int order){
  int nr=rows/32, nc=cols/32;
  for(int i=0;i<nr*nc;i++){
    int r=32*(order?i%nr:i/nc), c=32*(order?i/nr:i%nc);
    block(a,sa,a_tile_rstep,a_tile_pstep,b,sb,out,so,r,c,pairs);
  }
}
static void quadk(const char*a, long sa, const char*b, long sb, float*out, long so, int rows, int cols, int pairs, int kc){
  for(int p0=0;p0<pairs;p0+=kc){ int pe=p0+kc<pairs?p0+kc:pairs;
  for(int r=0;r<rows;r+=32) for(int c=0;c<cols;c+=32){
    float*o=out+(long)r*so/4+c;
    if(p0==0){_tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);}
    else {_tile_loadd(0,o,so);_tile_loadd(1,o+16,so);_tile_loadd(2,o+16*so/4,so);_tile_loadd(3,o+16*so/4+16,so);}
    for(int p=p0;p<pe;p+=16){
      const char*a0=a+(long)r*sa+p*4; const char*a1=a0+16*sa;
      const char*b0=b+(long)p*sb+c*4;
      _tile_loadd(4,a0,sa); _tile_loadd(6,b0,sb); _tile_dpbf16ps(0,4,6);
      _tile_loadd(7,b0+64,sb); _tile_dpbf16ps(1,4,7);
      _tile_loadd(5,a1,sa); _tile_dpbf16ps(2,5,6); _tile_dpbf16ps(3,5,7);
    }
    _tile_stored(0,o,so);_tile_stored(1,o+16,so);_tile_stored(2,o+16*so/4,so);_tile_stored(3,o+16*so/4+16,so);
  }}
}
int main(int argc,char**argv){
  if(syscall(SYS_arch_prctl,0x1023,18)){printf("no amx\n");return 1;}
  cfg_t cfg; memset(&cfg,0,sizeof cfg); cfg.palette=1; for(int t=0;t<8;t++){cfg.colsb[t]=64;cfg.rows[t]=16;}
  _tile_loadconfig(&cfg);
  int K=atoi(argv[1]), rows=atoi(argv[2]), cols=atoi(argv[3]); int pairs=K/2;
  char*A=aligned_alloc(64,(long)rows*pairs*4); char*B=aligned_alloc(64,(long)pairs*cols*4); float*O=aligned_alloc(64,(long)rows*cols*4);
  memset(A,0x3c,(long)rows*pairs*4); memset(B,0x3c,(long)pairs*cols*4);
  const char* names[]={"rowmajor r-outer","rowmajor c-outer","tilepacked r-outer","tilepacked c-outer"};
  for(int v=0;v<4;v++){
    int packed=v>=2, order=v&1;
    long sa = packed? 64 : (long)pairs*4;
    long rstep = packed? (long)16*pairs*4 : 16L*pairs*4;  // 16 rows down
    long pstep = packed? 1024 : 64;                       // 16 pairs right
    int it=0; double t0=now(), t;
    do { quad(A,sa,rstep,pstep,B,(long)cols*4,O,(long)cols*4,rows,cols,pairs,order); it++; t=now()-t0;} while(t<0.5);
    double fl=2.0*rows*cols*K*it;
    printf("K=%d rows=%d cols=%d %-20s %7.1f GFLOP/s\n",K,rows,cols,names[v],fl/t/1e9);
  }
  for(int kc=64;kc<=1024;kc*=2){ int it=0; double t0=now(),t;
    do { quadk(A,(long)pairs*4,B,(long)cols*4,O,(long)cols*4,rows,cols,pairs,kc); it++; t=now()-t0;} while(t<0.5);
    printf("K=%d rows=%d cols=%d kchunk %3d pairs      %7.1f GFLOP/s\n",K,rows,cols,kc,2.0*rows*cols*K*it/t/1e9);}
  _tile_release();
}
